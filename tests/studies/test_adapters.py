"""The study adapters' record of how a trainer run was computed."""

from __future__ import annotations

from budgetsearch.studies.adapters import name_mixed_configurations

AVX2, AVX512 = "aten=AVX2 onednn=AVX2 cpu=avx512", "aten=AVX512 onednn=auto cpu=avx512"


def _doc(*configs) -> dict:
    epochs = [{"epoch": i + 1, **({"threads": t, "kernels": k} if k else {})}
              for i, (t, k) in enumerate(configs)]
    return {"threads": 1, "kernels": AVX2, "epochs": epochs}


def test_a_run_resumed_under_other_threads_and_kernels_names_every_one() -> None:
    doc = _doc((1, AVX2), (2, AVX2), (10, AVX512))
    name_mixed_configurations(doc)
    assert (doc["threads"], doc["kernels"]) == ("1;2;10", f"{AVX2};{AVX512}")


def test_the_epochs_not_the_last_process_say_how_a_run_trained() -> None:
    doc = _doc((2, AVX512), (2, AVX512))  # resumed, with nothing left to train, at 1 on AVX2
    name_mixed_configurations(doc)
    assert (doc["threads"], doc["kernels"]) == (2, AVX512)


def test_epochs_recorded_before_the_fields_were_kept_are_skipped() -> None:
    doc = _doc((None, None), (2, AVX512))
    name_mixed_configurations(doc)
    assert (doc["threads"], doc["kernels"]) == (2, AVX512)
    old = _doc((None, None), (None, None))
    name_mixed_configurations(old)
    assert (old["threads"], old["kernels"]) == (1, AVX2)


def _tuned_cell(tmp_path, monkeypatch, diverging):
    """_train of a cell tuned on three rates, each rate's run faked: the rates in
    ``diverging`` raise the trainer's divergence error, the others validate 0.1 * lr * 100."""
    from types import SimpleNamespace

    from budgetsearch.errors import TrainingError
    from budgetsearch.studies import adapters

    def fake_runner(cell, plan, ctx, *, lr, out_dir):
        if lr in diverging:
            raise TrainingError(f"the loss became nan at lr {lr:g}", epoch=1, step=3)
        return {"best_accuracy": lr * 10, "final_accuracy": lr * 10, "val_loss": 1.0,
                "test_accuracy": lr * 5, "train_seconds": 1.0}

    monkeypatch.setattr(adapters, "_train_runner", fake_runner)
    study = SimpleNamespace(training={"lrs": [0.01, 0.02, 0.04], "engine": "runner", "lr": 0.02})
    cell = SimpleNamespace(study=study, method=SimpleNamespace(lr=None))
    ctx = SimpleNamespace(out_dir=tmp_path, extras={})
    return adapters, cell, ctx


def test_a_diverging_rate_is_left_out_and_the_others_decide(tmp_path, monkeypatch) -> None:
    import json

    adapters, cell, ctx = _tuned_cell(tmp_path, monkeypatch, diverging={0.04})
    doc = adapters._train(cell, None, ctx)
    assert doc["lr"] == 0.02 and ctx.extras["lr"] == 0.02
    assert doc["tuning"]["0.04"] == {"diverged": "the loss became nan at lr 0.04"}
    assert doc["tuning"]["0.02"]["val_accuracy"] == 0.2
    # recorded, so a resumed cell does not train the diverged rate again
    assert json.loads((tmp_path / "tuning.json").read_text())["0.04"] == {
        "diverged": "the loss became nan at lr 0.04"}


def test_a_cell_whose_every_rate_diverged_fails_naming_them(tmp_path, monkeypatch) -> None:
    import pytest

    from budgetsearch.errors import TrainingError

    adapters, cell, ctx = _tuned_cell(tmp_path, monkeypatch, diverging={0.01, 0.02, 0.04})
    with pytest.raises(TrainingError, match=r"every learning rate of training.lrs diverged: "
                                            r"lr 0.01: .*; lr 0.02: .*; lr 0.04: "):
        adapters._train(cell, None, ctx)
