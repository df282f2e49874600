"""Statistics for accuracies measured on the same test images.

* :func:`wilson`: the 95 % Wilson score interval of an accuracy over ``n`` images
  (Wilson 1927); better than the normal interval near 0 % and 100 %.
* :func:`mcnemar`: the exact McNemar test of two models scored on the same images:
  among the images exactly one of them gets right (``b`` only the first, ``c`` only
  the second), ``b`` is Binomial(b + c, 1/2) if both are equally accurate; the
  two-sided p-value is :func:`scipy.stats.binomtest`'s.
* :func:`paired_bootstrap`: a percentile bootstrap interval of the difference of two
  mean per-image scores, resampling the images (the same resample for both models).

An SNN's prediction depends on its random input spikes, so it is scored over several
encoder draws: ``correct`` is a ``[draws, images]`` array of 0/1.  Its per-image
*score* is the mean over draws (:func:`per_image`); the paired test uses the per-image
*majority* vote (:func:`majority`), a tie (an even number of draws, half right) being
decided by the first draw, so each image keeps one unbiased 0/1 outcome.
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054  # the 97.5 % quantile of the standard normal
ALPHA = 0.05  # significance level of the tables


def wilson(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (fractions in [0, 1]) of ``k`` successes in ``n`` trials.

    ``k`` may be fractional (a mean count over encoder draws).
    """
    if n <= 0:
        return (0.0, 1.0)
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar(b: int, c: int) -> float:
    """Two-sided p-value of the exact McNemar test with ``b`` and ``c`` discordant pairs."""
    from scipy.stats import binomtest

    if b + c == 0:
        return 1.0
    return float(binomtest(int(b), int(b) + int(c), 0.5).pvalue)


def per_image(correct) -> np.ndarray:
    """Per-image score in [0, 1]: the fraction of draws that classify the image correctly."""
    return np.asarray(correct, dtype=np.float64).reshape(-1, np.shape(correct)[-1]).mean(axis=0)


def majority(correct) -> np.ndarray:
    """Per-image majority vote over draws (0/1); a tie is decided by the first draw."""
    c = np.asarray(correct, dtype=np.float64).reshape(-1, np.shape(correct)[-1])
    score = c.mean(axis=0)
    return np.where(score == 0.5, c[0], score > 0.5).astype(np.int64)


def paired_bootstrap(a, b, n_boot: int = 10000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(a) - mean(b)`` over paired per-image scores.

    Resampling images with replacement only changes how often each per-image
    difference occurs, so the resampled means are drawn as multinomial counts over
    the distinct differences (exactly the image bootstrap, in O(distinct values)
    memory per resample instead of O(images)).
    """
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.ndim != 1 or len(d) == 0:
        raise ValueError("paired_bootstrap needs two equally long, non-empty 1-D score arrays")
    values, counts = np.unique(d, return_counts=True)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(len(d), counts / len(d), size=n_boot)
    means = draws @ values / len(d)
    tail = (1.0 - level) / 2
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return (float(lo), float(hi))


def accuracy_stats(correct) -> dict:
    """Accuracy (%) of a ``[draws, images]`` 0/1 array: Wilson interval and spread over draws."""
    c = np.asarray(correct, dtype=np.float64).reshape(-1, np.shape(correct)[-1])
    n = c.shape[1]
    per_draw = 100.0 * c.sum(axis=1) / n
    lo, hi = wilson(float(c.sum(axis=1).mean()), n)
    return {"mean": float(per_draw.mean()), "std": float(per_draw.std(ddof=1)) if len(per_draw) > 1 else 0.0,
            "min": float(per_draw.min()), "max": float(per_draw.max()), "ci95": [100.0 * lo, 100.0 * hi],
            "images": n, "draws": [float(x) for x in per_draw]}


def compare(correct_a, correct_b, seed: int = 0) -> dict:
    """Paired comparison of model A and model B on the same images (A - B, in points).

    ``diff``: difference of the mean accuracies; ``ci95``: its paired bootstrap
    interval over per-image scores; ``only_a``/``only_b``: images only A / only B gets
    right (the McNemar b and c, majority vote over draws); ``p``: exact McNemar p-value; ``significant``: p < 5 %.
    """
    sa, sb = per_image(correct_a), per_image(correct_b)
    if sa.shape != sb.shape:
        raise ValueError(f"paired comparison needs the same images ({len(sa)} vs {len(sb)})")
    ma, mb = majority(correct_a), majority(correct_b)
    b, c = int(((ma == 1) & (mb == 0)).sum()), int(((ma == 0) & (mb == 1)).sum())
    lo, hi = paired_bootstrap(sa, sb, seed=seed)
    p = mcnemar(b, c)
    return {"diff": 100.0 * float(sa.mean() - sb.mean()), "ci95": [100.0 * lo, 100.0 * hi],
            "only_a": b, "only_b": c, "p": p, "significant": p < ALPHA}
