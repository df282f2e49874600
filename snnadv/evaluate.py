"""Accuracy of ANNs and SNNs; an SNN's accuracy is a mean over encoder draws.

An SNN's output depends on the random input spikes, so one evaluation is one
sample of a random variable.  :func:`accuracy` evaluates ``draws`` times with
independent encoder randomness (a dedicated :class:`torch.Generator`, so the
numbers do not depend on what else used the global RNG) and reports the mean and
the spread; ``draws=1`` is the paper's single number.
"""

from __future__ import annotations

import statistics

import torch

from .data import Split, batches
from .models import SNN


def is_snn(model) -> bool:
    return isinstance(model, SNN)


@torch.no_grad()
def predict(model, images: torch.Tensor, batch_size: int = 256, num_steps: int | None = None) -> torch.Tensor:
    """Predicted labels for float images in [0, 1] (the model's current encoder RNG)."""
    preds = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        out = model(x, num_steps) if is_snn(model) else model(x)
        preds.append(out.argmax(1))
    return torch.cat(preds)


def _draw_seeds(seed: int, draws: int) -> list[int]:
    return [seed * 1000003 + d for d in range(draws)]


@torch.no_grad()
def accuracy(model, split: Split, batch_size: int = 256, draws: int = 1, seed: int = 0,
             num_steps: int | None = None, advance=None) -> dict:
    """Test accuracy (%) as ``{"mean", "std", "draws": [...]}``; eval mode, restored after.

    For an ANN ``draws`` is ignored (its output is deterministic).
    """
    was_training = model.training
    model.eval()
    snn = is_snn(model)
    results = []
    try:
        for s in _draw_seeds(seed, draws if snn else 1):
            if snn:
                g = torch.Generator(device=split.images.device)
                g.manual_seed(s)
                model.encoder.generator = g
            correct = 0
            for x, y in batches(split, batch_size, shuffle=False):
                out = model(x, num_steps) if snn else model(x)
                correct += (out.argmax(1) == y).sum().item()
                if advance:
                    advance(len(y))
            results.append(100.0 * correct / len(split))
    finally:
        if snn:
            model.encoder.generator = None
        model.train(was_training)
    return summarize(results)


def summarize(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "draws": list(values)}
