"""Fitting the latency predictor: non-negative least squares on relative error, and its
cross-validated error.

Each timed step j gives features x_j (:meth:`budgetsearch.cost.CostModel.latency_features`) and a
measured time m_j. The coefficients c >= 0 minimise sum_j ((x_j . c - m_j) / m_j)^2 (every step
counts by its relative error, so a 5 ms step at batch 1 weighs as much as a 2 s step at batch 32),
solved with the Lawson-Hanson active-set method on column-scaled features.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..errors import ProfileError
from ._model import FEATURES

__all__ = ["cross_validate", "fit_coefficients", "nnls"]


def nnls(a: np.ndarray, b: np.ndarray, *, max_iter: int | None = None) -> np.ndarray:
    """argmin_x ||a x - b||_2 subject to x >= 0 (Lawson and Hanson, 1974).

    Args:
        a: The (m, n) matrix.
        b: The (m,) right-hand side.
        max_iter: Bound on outer iterations (default 3 n).

    Returns:
        The (n,) non-negative solution.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    n = a.shape[1]
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    tol = 10 * np.finfo(float).eps * max(1.0, float(np.abs(a).max(initial=0.0))) * max(a.shape)
    for _ in range(max_iter or 3 * n):
        w = a.T @ (b - a @ x)
        candidates = ~passive & (w > tol)
        if not candidates.any():
            break
        passive[int(np.argmax(np.where(candidates, w, -np.inf)))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            # step back towards x until the first passive variable reaches zero
            neg = passive & (z <= 0)
            alpha = np.min(x[neg] / (x[neg] - z[neg]))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
    return x


def _matrix(samples: Sequence[Mapping[str, float]]) -> np.ndarray:
    unknown = sorted({k for s in samples for k in s} - set(FEATURES))
    if unknown:
        raise ProfileError(f"latency fit: unknown features {', '.join(unknown)}")
    return np.array([[float(s.get(f, 0.0)) for f in FEATURES] for s in samples])


def fit_coefficients(samples: Sequence[Mapping[str, float]], measured_ms: Sequence[float], *,
                     ridge: float = 1e-6) -> dict[str, float]:
    """Non-negative coefficients (ms per unit, by feature) that best reproduce the timed steps.

    Args:
        samples: Each timed step's features.
        measured_ms: Each step's measured time in milliseconds (> 0).
        ridge: A small penalty on the scaled coefficients, so features that no step separates
            get 0 rather than an arbitrary split.

    Raises:
        ProfileError: With no samples, mismatched lengths, or a non-positive time.
    """
    m = np.asarray(measured_ms, dtype=np.float64)
    if len(samples) == 0 or len(samples) != len(m):
        raise ProfileError(f"latency fit: need as many timed steps as feature rows, and at least "
                           f"one; got {len(samples)} rows and {len(m)} times")
    if not np.isfinite(m).all() or (m <= 0).any():
        raise ProfileError("latency fit: every measured time must be a finite number > 0 ms")
    x = _matrix(samples)
    a = x / m[:, None]
    scale = np.abs(a).max(axis=0)
    used = scale > 0
    a_s = a[:, used] / scale[used]
    k = a_s.shape[1]
    a_aug = np.vstack([a_s, np.sqrt(ridge) * np.eye(k)])
    b_aug = np.concatenate([np.ones(len(m)), np.zeros(k)])
    coef = np.zeros(len(FEATURES))
    coef[used] = nnls(a_aug, b_aug) / scale[used]
    return {f: float(c) for f, c in zip(FEATURES, coef, strict=True)}


def predict(coefficients: Mapping[str, float], samples: Sequence[Mapping[str, float]]
            ) -> np.ndarray:
    """Predicted milliseconds of each sample."""
    c = np.array([coefficients.get(f, 0.0) for f in FEATURES])
    return _matrix(samples) @ c


def cross_validate(samples: Sequence[Mapping[str, float]], measured_ms: Sequence[float], *,
                   folds: int = 5, groups: Sequence[str] | None = None, seed: int = 0
                   ) -> np.ndarray:
    """Relative errors (predicted / measured - 1) of each step when predicted by coefficients
    fitted without its fold.

    Args:
        samples: Each timed step's features.
        measured_ms: Each step's measured time in milliseconds.
        folds: Number of folds (at most the number of steps, or of groups).
        groups: Optional label per step; steps of one label share a fold (e.g. one plan at every
            batch size), so a fold never holds a near-copy of a held-out step.
        seed: Seed of the fold assignment.
    """
    m = np.asarray(measured_ms, dtype=np.float64)
    labels = list(groups) if groups is not None else [str(i) for i in range(len(m))]
    unique = sorted(set(labels))
    folds = max(2, min(folds, len(unique)))
    order = np.random.default_rng(seed).permutation(len(unique))
    fold_of = {unique[j]: i % folds for i, j in enumerate(order)}
    errors = np.zeros(len(m))
    for f in range(folds):
        test = np.array([fold_of[g] == f for g in labels])
        if not test.any() or test.all():
            continue
        train = [s for s, t in zip(samples, test, strict=True) if not t]
        coef = fit_coefficients(train, m[~test])
        held = [s for s, t in zip(samples, test, strict=True) if t]
        errors[test] = predict(coef, held) / m[test] - 1.0
    return errors
