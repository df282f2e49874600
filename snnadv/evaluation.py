"""Accuracy of ANNs and SNNs; an SNN's accuracy is a mean over encoder draws.

An SNN's output depends on the random input spikes, so one evaluation is one
sample of a random variable.  :func:`accuracy` evaluates ``draws`` times with
independent encoder randomness (a dedicated :class:`torch.Generator`, so the
numbers do not depend on what else used the global RNG) and reports the mean and
the spread; ``draws=1`` is the paper's single number.  :func:`correctness` keeps
which images each draw gets right, so accuracies get intervals over images and two
models scored on the same images can be compared image by image
(:mod:`snnadv.stats`).
"""

from __future__ import annotations

import statistics

import torch

from .batching import Split, to_float
from .encoding import encoder_seed
from .models import SNN


def is_snn(model) -> bool:
    return isinstance(model, SNN)


def _draw_seeds(seed: int, draws: int) -> list[int]:
    return [seed * 1000003 + d for d in range(draws)]


@torch.no_grad()
def accuracy(model, split: Split, batch_size: int = 256, draws: int = 1, seed: int = 0,
             num_steps: int | None = None, advance=None) -> dict:
    """Test accuracy (%) on a split, as ``{"mean", "std", "draws": [...]}`` (see :func:`accuracy_on`)."""
    return accuracy_on(model, to_float(split.images), split.labels, batch_size, draws, seed, num_steps, advance)


@torch.no_grad()
def accuracy_on(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256, draws: int = 1,
                seed: int = 0, num_steps: int | None = None, advance=None, per_sample: bool = False) -> dict:
    """Accuracy (%) on float images in [0, 1]: mean and spread over ``draws`` encoder draws.

    Each draw uses its own generator (seeded from ``seed``), so the same call gives
    the same numbers.  For an ANN ``draws`` is ignored (its output is deterministic).
    The model is evaluated in eval mode and returned to its previous mode.  With
    ``per_sample`` the result also has the 95 % Wilson interval over images
    (``ci95``), the range over draws (``min``, ``max``) and ``correct``: one string
    of 0/1 per draw, one character per image (:func:`decode_correct` reads it back),
    so paired tests between models on the same images are possible.
    """
    correct = correctness(model, images, labels, batch_size, draws, seed, num_steps, advance)
    if not per_sample:
        return summarize([100.0 * int(c.sum()) / len(labels) for c in correct])
    from .stats import accuracy_stats

    return {**accuracy_stats(correct.numpy()), "correct": encode_correct(correct)}


@torch.no_grad()
def correctness(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256, draws: int = 1,
                seed: int = 0, num_steps: int | None = None, advance=None) -> torch.Tensor:
    """Which images the model classifies correctly: a CPU bool tensor ``[draws, images]``.

    The draws and their seeds are those of :func:`accuracy_on` (one row for an ANN).
    """
    was_training = model.training
    model.eval()
    snn = is_snn(model)
    rows = []
    try:
        for s in _draw_seeds(seed, draws if snn else 1):
            hits = []  # stays on the device: no host sync per batch
            with encoder_seed(model, s if snn else None, images.device):
                for i in range(0, len(images), batch_size):
                    x, y = images[i:i + batch_size], labels[i:i + batch_size]
                    out = model(x, num_steps) if snn else model(x)
                    hits.append(out.argmax(1) == y)
                    if advance:
                        advance(len(y))
            rows.append(torch.cat(hits).cpu() if hits else torch.zeros(0, dtype=torch.bool))
    finally:
        model.train(was_training)
    return torch.stack(rows)


def encode_correct(correct: torch.Tensor) -> list[str]:
    """``[draws, images]`` bools -> one '0'/'1' string per draw (compact in JSON)."""
    return ["".join("1" if v else "0" for v in row.tolist()) for row in correct]


def decode_correct(strings: list[str]) -> list[list[int]]:
    """The inverse of :func:`encode_correct`: ``[draws][images]`` of 0/1."""
    return [[1 if ch == "1" else 0 for ch in s] for s in strings]


def summarize(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "draws": list(values)}
