"""Accuracy of ANNs and SNNs; an SNN's accuracy is a mean over encoder draws.

An SNN's output depends on the random input spikes, so one evaluation is one
sample of a random variable.  :func:`accuracy` evaluates ``draws`` times with
independent encoder randomness (a dedicated :class:`torch.Generator`, so the
numbers do not depend on what else used the global RNG) and reports the mean and
the spread; ``draws=1`` is the paper's single number.  :func:`correctness` keeps
which images each draw gets right, so accuracies get intervals over images and two
models scored on the same images can be compared image by image
(:mod:`snnadv.stats`).

Keyed and sharded.  Draw d's spikes are keyed (:func:`snnadv.encoding.encoder_keys`)
by its seed and each image's index in ``images``: the spikes an image gets depend on
neither the batch size nor the other images of its batch.  Under ``torchrun`` each
process evaluates its contiguous shard of the images (:func:`snnadv.parallel.shard`)
and the per-image results are gathered back in order on every process
(:func:`snnadv.parallel.gather_cat`), so the result is the same for any number of
processes and any batch size.
"""

from __future__ import annotations

import statistics

import torch

from . import parallel
from .batching import Split, to_float
from .encoding import encoder_keys
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

    The draws and their seeds are those of :func:`accuracy_on` (one row for an ANN);
    keyed and sharded as the module docstring says (the same on every process).
    """
    pred = predictions(model, images, batch_size, draws, seed, num_steps, advance)
    return (pred == labels.to(pred.device)).cpu()


@torch.no_grad()
def predictions(model, images: torch.Tensor, batch_size: int = 256, draws: int = 1, seed: int = 0,
                num_steps: int | None = None, advance=None, index: torch.Tensor | None = None,
                sharded: bool = True) -> torch.Tensor:
    """Predicted classes ``[draws, images]`` (int64, on ``images``' device; one row for an
    ANN).  Draw d is keyed by its seed (``_draw_seeds(seed, draws)[d]``) and the images'
    indices; this process evaluates its shard of the images, and the gathered result is
    the same on every process, for any number of processes and any batch size.

    ``advance(n)`` after every batch, by the batch's size times the number of processes
    (about the whole set's progress, counted on one process's share).  The model is
    evaluated in eval mode and returned to its previous mode.  ``index``: the images'
    global indices when they are not ``0..N-1`` (e.g. the cascade's still-correct
    images); ``sharded=False``: this process evaluates all of them, nothing is gathered.
    """
    w = parallel.world() if sharded else parallel.World()
    part = parallel.shard(len(images), w)
    was_training = model.training
    model.eval()
    snn = is_snn(model)
    rows = []
    try:
        for s in _draw_seeds(seed, draws if snn else 1):
            preds = []  # stays on the device: no host sync per batch
            for i in range(part.start, part.stop, batch_size):
                j = min(i + batch_size, part.stop)
                x = images[i:j]
                if snn:
                    keys = torch.arange(i, j, device=images.device) if index is None else index[i:j].to(images.device)
                    with encoder_keys(model, s, keys):
                        out = model(x, num_steps)
                else:
                    out = model(x)
                preds.append(out.argmax(1))
                if advance:
                    advance((j - i) * w.size)
            rows.append(torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64, device=images.device))
    finally:
        model.train(was_training)
    mine = torch.stack(rows)  # [draws, this shard]
    return parallel.gather_cat(mine.t().contiguous(), w).t()


def encode_correct(correct: torch.Tensor) -> list[str]:
    """``[draws, images]`` bools -> one '0'/'1' string per draw (compact in JSON)."""
    return ["".join("1" if v else "0" for v in row.tolist()) for row in correct]


def decode_correct(strings: list[str]) -> list[list[int]]:
    """The inverse of :func:`encode_correct`: ``[draws][images]`` of 0/1."""
    return [[1 if ch == "1" else 0 for ch in s] for s in strings]


def summarize(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "draws": list(values)}


@torch.no_grad()
def curve_correctness(snn: SNN, images: torch.Tensor, labels: torch.Tensor, steps: list[int],
                      batch_size: int = 256, seed: int = 0, advance=None) -> torch.Tensor:
    """Which images ``snn`` classifies correctly after each of ``steps`` timesteps of one run
    (:meth:`SNN.forward_curve`): a CPU bool tensor ``[len(steps), images]`` (steps sorted).

    The spikes are those of draw 0 of :func:`predictions` with this ``seed`` (keyed by its
    seed and the images' indices), so the row of the last step is what :func:`correctness`
    gives at that T with ``draws=1``; this process evaluates its shard and the result is
    gathered in order: the same for any number of processes and any batch size.  The model is evaluated in eval mode and
    returned to its previous mode.
    """
    w = parallel.world()
    part = parallel.shard(len(images), w)
    steps = sorted(set(int(t) for t in steps))
    was_training = snn.training
    snn.eval()
    hits = []
    try:
        for i in range(part.start, part.stop, batch_size):
            j = min(i + batch_size, part.stop)
            with encoder_keys(snn, _draw_seeds(seed, 1)[0], torch.arange(i, j, device=images.device)):
                logits = snn.forward_curve(images[i:j], steps)  # [steps, B, classes]
            hits.append(logits.argmax(-1) == labels[i:j].to(logits.device))
            if advance:
                advance((j - i) * w.size)
    finally:
        snn.train(was_training)
    mine = torch.cat(hits, 1) if hits else torch.zeros((len(steps), 0), dtype=torch.bool, device=images.device)
    return parallel.gather_cat(mine.t().contiguous(), w).t().cpu()


def accuracy_curve_on(snn: SNN, images: torch.Tensor, labels: torch.Tensor, steps: list[int],
                      batch_size: int = 256, seed: int = 0, advance=None) -> dict[int, float]:
    """Accuracy (%) after each of ``steps`` timesteps of one run per image, ``{t: percent}``
    (:func:`curve_correctness`: keyed, sharded, the same for any number of processes)."""
    ordered = sorted(set(int(t) for t in steps))
    correct = curve_correctness(snn, images, labels, ordered, batch_size, seed, advance)
    n = max(len(labels), 1)
    return {t: 100.0 * int(correct[k].sum()) / n for k, t in enumerate(ordered)}
