"""The latency fit: non-negative least squares against brute force, exact recovery of a known
linear model, and cross-validation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from budgetsearch.errors import ProfileError
from budgetsearch.latency import FEATURES, cross_validate, fit_coefficients, nnls


def _brute_nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The NNLS optimum by trying every support (small n only)."""
    n = a.shape[1]
    best, best_x = np.inf, np.zeros(n)
    for k in range(n + 1):
        for support in itertools.combinations(range(n), k):
            x = np.zeros(n)
            if support:
                x[list(support)] = np.linalg.lstsq(a[:, list(support)], b, rcond=None)[0]
            if (x < -1e-12).any():
                continue
            r = float(np.sum((a @ x - b) ** 2))
            if r < best - 1e-12:
                best, best_x = r, x
    return best_x


@pytest.mark.parametrize("seed", range(8))
def test_nnls_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(12, 5))
    b = rng.normal(size=12)
    x = nnls(a, b)
    expected = _brute_nnls(a, b)
    assert (x >= 0).all()
    np.testing.assert_allclose(np.sum((a @ x - b) ** 2), np.sum((a @ expected - b) ** 2),
                               rtol=1e-9, atol=1e-12)


def test_nnls_unconstrained_optimum_when_positive() -> None:
    a = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    x_true = np.array([0.5, 3.0])
    np.testing.assert_allclose(nnls(a, a @ x_true), x_true, rtol=1e-12)
    # a negative best coordinate is clipped to 0 and the other refitted
    np.testing.assert_allclose(nnls(np.eye(2), np.array([-1.0, 2.0])), [0.0, 2.0])


def _synthetic(n: int, seed: int) -> tuple[list[dict[str, float]], np.ndarray, dict[str, float]]:
    rng = np.random.default_rng(seed)
    used = ["step.calls", "forward.conv.calls", "forward.conv.macs", "backward.conv.bytes",
            "backward.filtered.calls", "optimizer.bytes"]
    truth = {"step.calls": 2.0, "forward.conv.calls": 0.05, "forward.conv.macs": 1e-8,
             "backward.conv.bytes": 3e-7, "backward.filtered.calls": 0.3,
             "optimizer.bytes": 1e-7}
    samples = []
    for _ in range(n):
        s = {"step.calls": 1.0, "forward.conv.calls": float(rng.integers(5, 60)),
             "forward.conv.macs": float(rng.uniform(1e6, 1e9)),
             "backward.conv.bytes": float(rng.uniform(0, 1e7)),
             "backward.filtered.calls": float(rng.integers(0, 6)),
             "optimizer.bytes": float(rng.uniform(0, 1e7))}
        samples.append(s)
    assert set(used) <= set(FEATURES)
    ms = np.array([sum(truth[k] * s[k] for k in s) for s in samples])
    return samples, ms, truth


def test_fit_recovers_a_known_linear_model() -> None:
    samples, ms, truth = _synthetic(40, 0)
    coef = fit_coefficients(samples, ms, ridge=0.0)
    for k, v in truth.items():
        assert coef[k] == pytest.approx(v, rel=1e-6)
    assert all(coef[k] == 0.0 for k in FEATURES if k not in truth)


def test_cross_validation_of_an_exact_model_is_near_zero_and_of_noise_is_not() -> None:
    samples, ms, _ = _synthetic(40, 1)
    assert np.abs(cross_validate(samples, ms, folds=5)).max() < 1e-3
    noisy = ms * np.random.default_rng(2).uniform(0.5, 1.5, size=len(ms))
    assert np.median(np.abs(cross_validate(samples, noisy, folds=5))) > 0.05


def test_groups_keep_a_plan_in_one_fold() -> None:
    samples, ms, _ = _synthetic(12, 3)
    groups = [f"plan{i // 3}" for i in range(12)]
    err = cross_validate(samples, ms, folds=4, groups=groups)
    assert err.shape == (12,)


@pytest.mark.parametrize(("samples", "ms", "match"), [
    ([], [], "at least one"),
    ([{"step.calls": 1.0}], [1.0, 2.0], "as many"),
    ([{"step.calls": 1.0}], [0.0], "> 0"),
    ([{"nonsense": 1.0}], [1.0], "unknown features nonsense"),
])
def test_fit_refuses_bad_input(samples, ms, match) -> None:
    with pytest.raises(ProfileError, match=match):
        fit_coefficients(samples, ms)
