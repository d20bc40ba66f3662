"""Scores files: round trip, fingerprint refusal, malformed files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from torch import nn

from budgetsearch.criteria import LayerScores, Scores, random_scores
from budgetsearch.errors import ScoresError


def _model(width: int = 4) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3),
        nn.Conv2d(width, width, 3, groups=width),
        nn.Flatten(),
        nn.Linear(width, 2),
    )


def test_round_trip(tmp_path):
    model = _model()
    scores = random_scores(model, seed=1)
    scores.layers["1"].in_channel = None
    scores.metadata["note"] = "ü"
    path = scores.save(tmp_path / "sub" / "s.npz")
    assert [p.name for p in path.parent.iterdir()] == ["s.npz"]  # no temporary file left
    loaded = Scores.load(path, model=model)
    assert loaded.criterion == "random" and loaded.fingerprint == scores.fingerprint
    assert loaded.metadata == scores.metadata
    assert loaded.in_channels == {"0": 3, "1": 4, "3": 4}
    for name in scores:
        np.testing.assert_array_equal(loaded[name].out_channel, scores[name].out_channel)
        assert loaded[name].layer == scores[name].layer
    assert loaded["1"].in_channel is None
    np.testing.assert_array_equal(loaded["0"].in_channel, scores["0"].in_channel)
    with np.load(path, allow_pickle=False) as npz:
        assert json.loads(str(npz["meta"][0]))["criterion"] == "random"


def test_other_model_refused(tmp_path):
    path = random_scores(_model(4)).save(tmp_path / "s.npz")
    with pytest.raises(ScoresError, match=r"1: shape \[5, 1, 3, 3\] in the model"):
        Scores.load(path, model=_model(5))
    other = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ScoresError, match="missing from the model"):
        Scores.load(path, model=other)


def test_malformed_files(tmp_path):
    with pytest.raises(ScoresError, match="does not exist"):
        Scores.load(tmp_path / "none.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ScoresError, match="not a readable"):
        Scores.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", meta=np.array(['{"format": "x"}']))
    with pytest.raises(ScoresError, match="not a budgetsearch scores file"):
        Scores.load(tmp_path / "other.npz")
    good = random_scores(_model())
    good.save(tmp_path / "g.npz")
    with np.load(tmp_path / "g.npz") as npz:
        arrays = dict(npz)
    arrays["out_0"] = arrays["out_0"][:2]
    np.savez(tmp_path / "short.npz", **arrays)
    with pytest.raises(ScoresError, match="0: 2 output-channel scores for 4 channels"):
        Scores.load(tmp_path / "short.npz")


def test_construction_checks():
    model = _model()
    with pytest.raises(ScoresError, match="gave no scores"):
        Scores.for_model(model, criterion="x", layers={})
    layers = {
        n: LayerScores(np.zeros(s[0]), None, 0.0) for n, s in {"0": [4], "1": [4], "3": [2]}.items()
    }
    layers["3"] = LayerScores(np.zeros(3), None, 0.0)
    with pytest.raises(ScoresError, match="3: 3 output-channel scores for 2"):
        Scores.for_model(model, criterion="x", layers=layers)
    with pytest.raises(ScoresError, match="no scores for layer 'nope'"):
        random_scores(model)["nope"]


def test_filtered_scores_round_trip_and_version_1_files_load(tmp_path):
    model = _model()
    scores = random_scores(model, seed=2)
    scores.layers["0"].filtered = {2: scores["0"].out_channel / 2, 4: scores["0"].out_channel / 4}
    path = scores.save(tmp_path / "f.npz")
    loaded = Scores.load(path, model=model)
    assert list(loaded["0"].filtered) == [2, 4] and loaded["1"].filtered == {}
    np.testing.assert_array_equal(loaded["0"].filtered[4], scores["0"].out_channel / 4)
    # a version-1 file (before filtered scores) still loads, with none
    with np.load(path) as npz:
        arrays = {k: v for k, v in npz.items() if not k.startswith("filt")}
    meta = json.loads(str(arrays["meta"][0]))
    arrays["meta"] = np.array([json.dumps({**meta, "version": 1})])
    np.savez(tmp_path / "v1.npz", **arrays)
    assert Scores.load(tmp_path / "v1.npz")["0"].filtered == {}
    arrays["meta"] = np.array([json.dumps({**meta, "version": 9})])
    np.savez(tmp_path / "v9.npz", **arrays)
    with pytest.raises(ScoresError, match="version 9, this budgetsearch reads versions 1, 2"):
        Scores.load(tmp_path / "v9.npz")
    bad = random_scores(model, seed=2)
    bad.layers["0"].filtered = {2: np.ones(3)}
    with pytest.raises(ScoresError, match="0: filtered scores for patch size 2 must be 4 values"):
        bad.validate()


def _saved_arrays(tmp_path) -> dict[str, np.ndarray]:
    random_scores(_model()).save(tmp_path / "g.npz")
    with np.load(tmp_path / "g.npz") as npz:
        return dict(npz)


@pytest.mark.parametrize(("change", "message"), [
    (lambda a: a.__setitem__("out_0", np.full(4, np.nan)),
     r"b.npz: 0: output-channel scores contain NaN or infinite values"),
    (lambda a: a["layer"].__setitem__(1, np.inf), r"b.npz: 1: the layer score is inf"),
    (lambda a: a.__setitem__("out_0", a["out_0"].reshape(2, 2)),
     r"b.npz: array 'out_0' must be a vector of real numbers; got shape \(2, 2\)"),
    (lambda a: a.__setitem__("out_0", a["out_0"] * (1 + 2j)),
     r"b.npz: array 'out_0' must be a vector .* dtype complex128"),
    (lambda a: a.__setitem__("filt2_9", np.ones(4)),
     r"b.npz: filtered scores for layer indices \[9\], the file has 3 layers"),
    (lambda a: a.__setitem__("meta", np.array(["[1]"])), r"b.npz: not a budgetsearch scores"),
])
def test_values_that_would_rank_wrongly_are_refused_by_name(tmp_path, change, message):
    """A NaN ranks a layer first or last; a matrix or complex values were flattened or cast."""
    arrays = _saved_arrays(tmp_path)
    arrays["layer"] = arrays["layer"].copy()
    change(arrays)
    np.savez(tmp_path / "b.npz", **arrays)
    with pytest.raises(ScoresError, match=message):
        Scores.load(tmp_path / "b.npz")


def test_nan_scores_are_refused_when_built_and_a_truncated_file_is_named(tmp_path):
    model = _model()
    layers = {n: LayerScores(np.ones(s[0]), None, 1.0) for n, s in {"0": [4], "1": [4],
                                                                    "3": [2]}.items()}
    layers["1"] = LayerScores(np.array([1.0, np.nan, 2.0, 3.0]), None, 1.0)
    with pytest.raises(ScoresError, match="1: output-channel scores contain NaN"):
        Scores.for_model(model, criterion="x", layers=layers)
    good = random_scores(model).save(tmp_path / "g.npz")
    (tmp_path / "cut.npz").write_bytes(good.read_bytes()[:200])  # starts as a zip, then ends
    with pytest.raises(ScoresError, match=r"cut\.npz: not a readable \.npz scores file"):
        Scores.load(tmp_path / "cut.npz")


def test_input_channels_the_model_does_not_have_are_refused(tmp_path):
    """Weight shapes leave out the groups: a grouped conv's input channels are checked apart."""
    arrays = _saved_arrays(tmp_path)
    meta = json.loads(str(arrays["meta"][0]))
    meta["layers"][1]["in_channels"] = 2  # the depthwise conv has 4
    arrays["meta"] = np.array([json.dumps(meta)])
    arrays["in_1"] = np.ones(2)
    np.savez(tmp_path / "b.npz", **arrays)
    Scores.load(tmp_path / "b.npz")  # consistent in itself
    with pytest.raises(ScoresError, match="give layer 1 2 input channels; the model's has 4"):
        Scores.load(tmp_path / "b.npz", model=_model())
