"""The training core: one epoch loop for the ANN (paper Sec. 3.2) and hybrid SNN-BP fine-tuning.

:func:`fit` is the loop: shuffled, augmented batches, cross-entropy, per-epoch test
accuracy, and the state to resume from after every epoch (optimizer, scheduler, every
RNG state, the history), so a resumed run gives the same result as an uninterrupted
one.  A NaN/inf loss stops the run with a one-line :class:`TrainingError` before the
epoch's state is handed out.  ``fit`` never prints and never touches disk: its caller
gets the progress and the per-epoch state through callbacks (:class:`FitHooks`) and
decides what to show and what to save (the ``train-ann`` and ``finetune`` stages in
:mod:`snnadv.train`).

The recipes are typed settings: :class:`AnnRecipe` (the paper's SGD with a step
schedule, or AdamW with LSUV init, warm-up and a per-batch linear/cosine decay with
warm restarts), :class:`FinetuneRecipe` (Adam, the lr halved every few epochs) and
:class:`FitSettings` (the loop's own settings).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from .errors import TrainingError
from .parallel import all_reduce, shard, world


def _pick(cls, settings: dict):
    """``cls`` from the entries of ``settings`` named like its fields (lists become tuples)."""
    return cls(**{f.name: tuple(v) if isinstance(v := settings[f.name], list) else v
                  for f in fields(cls) if f.name in settings})


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class FitSettings:
    """The epoch loop's settings: ``per_batch`` steps the scheduler after every batch
    (else after every epoch); the test accuracy after epoch ``e`` (from 0) is
    evaluated with seed ``seed + e``."""

    epochs: int
    batch_size: int
    seed: int
    eval_batch_size: int = 256
    per_batch: bool = False
    label_smoothing: float = 0.0
    save_every: float = 0.0  # seconds between mid-epoch states (``FitHooks.partial``); 0: none


@dataclass(frozen=True)
class AnnRecipe:
    """How an ANN is trained: the paper's recipe (SGD with momentum, lr divided by 10 at
    each of ``milestones``) by default, or the faster one of ``configs/vgg5_cifar10_cpu.toml``
    (``optimizer="adamw"``, ``init="lsuv"``, ``schedule="linear"`` or ``"cosine"`` with
    ``warmup`` epochs and warm restarts at ``lr_restarts``; see :func:`lr_factor`)."""

    epochs: int
    lr: float
    milestones: tuple[int, ...] = ()
    momentum: float = 0.9
    weight_decay: float = 1e-4
    optimizer: str = "sgd"  # sgd | adamw
    nesterov: bool = False
    schedule: str = "step"  # step | linear | cosine
    warmup: float = 0.0
    label_smoothing: float = 0.0
    init: str = "he"  # he (PyTorch's default) | lsuv (:func:`lsuv_init`)
    lr_restarts: tuple[int, ...] = ()
    lr_restart_peak: float = 0.5

    @classmethod
    def of(cls, settings: dict) -> "AnnRecipe":
        """The recipe in a stage's resolved settings (other entries are ignored)."""
        return _pick(cls, settings)

    @property
    def per_batch(self) -> bool:
        """The linear/cosine schedules step after every batch; the step schedule per epoch."""
        return self.schedule != "step"

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        if self.optimizer == "adamw":
            return make_optimizer(torch.optim.AdamW, params, lr=self.lr, weight_decay=self.weight_decay)
        return make_optimizer(torch.optim.SGD, params, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov,
                              weight_decay=self.weight_decay)

    def make_scheduler(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
        """The paper's step schedule (per epoch), or the per-batch :func:`lr_factor` schedule."""
        if self.schedule == "step":
            return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(self.milestones), 0.1)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(self, steps_per_epoch))


@dataclass(frozen=True)
class FinetuneRecipe:
    """SNN-BP fine-tuning (Sec. 3.2): Adam, the lr multiplied by ``lr_gamma`` every ``lr_step`` epochs."""

    epochs: int
    lr: float = 1e-4
    lr_step: int = 5
    lr_gamma: float = 0.5
    weight_decay: float = 5e-4

    @classmethod
    def of(cls, settings: dict) -> "FinetuneRecipe":
        return _pick(cls, settings)

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        return make_optimizer(torch.optim.Adam, params, lr=self.lr, weight_decay=self.weight_decay)

    def make_scheduler(self, optimizer: torch.optim.Optimizer):
        return torch.optim.lr_scheduler.StepLR(optimizer, self.lr_step, self.lr_gamma)


# --------------------------------------------------------------------------- optimizer, schedules, init
def make_optimizer(cls, params, **kw) -> torch.optim.Optimizer:
    """``cls(params, **kw)`` with PyTorch's fused (one kernel per step) implementation
    where this PyTorch has it for these parameters, the plain one otherwise.  Same
    update, fewer passes over memory: on the 2-core CPU, Adam over VGG5's 9.7 M
    parameters inside an SNN-BP training step took 12.8 -> 4.3 ms (alone, on cold
    caches: 39.1 -> 3.5 ms; SGD with momentum 13.8 -> 2.4 ms).
    """
    params = list(params)
    try:
        return cls(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):  # older PyTorch, or a device without fused kernels
        return cls(params, **kw)


def lr_factor(recipe: AnnRecipe, steps_per_epoch: int) -> Callable[[int], float]:
    """The per-batch lr multiplier of the linear/cosine schedules: a linear warm-up over
    ``warmup`` epochs, then decay to 0 at the end of each cycle. ``lr_restarts`` (epochs) start
    new cycles (warm restarts, SGDR-style without warm-up), the k-th at ``lr_restart_peak**k``
    of the peak lr; without restarts the run is one cycle."""
    bounds = [0, *(r * steps_per_epoch for r in recipe.lr_restarts), recipe.epochs * steps_per_epoch]
    warm, peak = round(recipe.warmup * steps_per_epoch), recipe.lr_restart_peak
    linear = recipe.schedule == "linear"

    def factor(step: int) -> float:  # (a plain function: LambdaLR saves no state for it)
        k = max(i for i in range(len(bounds) - 1) if bounds[i] <= step or i == 0)
        start, end = bounds[k] + (warm if k == 0 else 0), bounds[k + 1]
        if k == 0 and step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - start) / max(1, end - start))
        return peak ** k * (1.0 - t if linear else 0.5 * (1.0 + math.cos(math.pi * t)))

    return factor


@torch.no_grad()
def lsuv_init(model: torch.nn.Module, images: torch.Tensor, rounds: int = 3) -> None:
    """Data-dependent initialisation, LSUV (Mishkin & Matas, ICLR 2016).

    Every convolution and linear layer, in order, gets an orthogonal weight scaled so
    that its output on ``images`` (a training batch in [0, 1], dropout off) has unit
    standard deviation.  Without batch norm this puts every layer's activations on the
    same scale at the start (with AdamW, VGG5 then learns from the first epoch; SGD at
    lr 0.05 was unstable from it: see configs/vgg5_cifar10_cpu.toml).
    """
    was_training = model.training
    model.eval()
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    for layer in layers:
        layer.weight.copy_(torch.nn.init.orthogonal_(torch.empty_like(layer.weight, memory_format=torch.contiguous_format)))
        for _ in range(rounds):
            seen = []
            hook = layer.register_forward_hook(lambda mod, inp, out: seen.append(out.std()))
            try:
                model(images)
            finally:
                hook.remove()
            layer.weight.div_(seen[0].clamp_min(1e-8))
    model.train(was_training)


# --------------------------------------------------------------------------- the loop
def _rng_state(gen: torch.Generator) -> dict:
    state = {"data": gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack([s for s in torch.cuda.get_rng_state_all()])
    return state


def _set_rng_state(gen: torch.Generator, state: dict) -> None:
    gen.set_state(state["data"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def _plain(obj):
    """Containers as plain dicts/lists (a checkpoint must load with weights_only=True)."""
    if isinstance(obj, dict):  # also Counter (MultiStepLR's milestones)
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


@contextmanager
def _no_progress(description: str, total: int | None):
    yield lambda n=1, info=None: None


@dataclass
class FitHooks:
    """What :func:`fit` reports to its caller (all optional).

    ``progress(description, total)``: a context manager yielding ``advance(n, info)``,
    entered for every epoch (:meth:`snnadv.report.Reporter.progress` is one);
    ``resumed(epoch)``: the state of ``epoch`` completed epochs was loaded;
    ``epoch_done(row, state)``: after every epoch, its history row and the state to
    resume from (the caller saves it: the checkpoint);
    ``partial(state)``: within an epoch, every ``FitSettings.save_every`` seconds, the
    state to resume from in the middle of that epoch (``state["batch"]`` batches of
    epoch ``state["epoch"] + 1`` done); resuming from it gives the same result as an
    uninterrupted run.
    """

    progress: Callable = _no_progress
    resumed: Callable[[int], None] | None = None
    epoch_done: Callable[[dict, dict], None] | None = None
    partial: Callable[[dict], None] | None = None


def _batch_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    """The global RNG's seed for one rank's share of one batch under DDP: every rank
    draws its own dropout masks and encoder spikes (not copies of rank 0's), and a
    resumed run draws the same ones."""
    return (((seed * 1_000_003 + epoch) * 1_000_003 + batch) * 1_009 + rank) % (2**63)


#: batches between reads of the running loss, per device type (see :func:`fit`)
SYNC_EVERY = {"cpu": 1, "cuda": 20}


def _require_memory(net, batch: int) -> bool:
    """Refuse to fine-tune an SNN on batches of ``batch`` images that would not fit the free
    memory (:func:`snnadv.memory.require`; a training batch is not split), before the
    kernel's OOM killer ends the run; an ANN is not checked.  Returns True."""
    from . import memory
    from .models import SNN

    if isinstance(net, SNN):
        memory.require(net, batch, net.num_steps, "snn-train", None, "fine-tuning", training=True)
    return True


def fit(model, epoch_batches: Callable[[torch.Generator], Iterable], test_accuracy: Callable, *, optimizer,
        scheduler, settings: FitSettings, train_size: int, device, resume: dict | None = None,
        hooks: FitHooks | None = None) -> list[dict]:
    """Train ``model`` for ``settings.epochs`` epochs; returns the per-epoch history.

    ``epoch_batches(generator)`` yields one epoch's ``(images, labels)`` batches of the
    ``train_size`` training images, shuffled with ``generator``; ``test_accuracy(model,
    seed)`` is the test accuracy (%) after an epoch.  ``resume`` is a state handed out
    by ``hooks.epoch_done`` (from an interrupted run).  The ``scheduler`` steps after
    every epoch, or after every batch with ``settings.per_batch``.

    The loss and accuracy are summed on the device and read back every
    :data:`SYNC_EVERY` batches on a GPU (every batch on a CPU, where reading is free),
    so the host does not wait for the GPU after each step.  A non-finite loss stops
    training at that read, before the epoch's state is handed out.

    Many processes (:mod:`snnadv.parallel`; ``model`` wrapped in DistributedDataParallel
    by the caller): every rank draws the same global batches (the same generator, so the
    same permutation and augmentation) and trains on its contiguous slice; its loss is
    its share of the global batch's mean, ``(N / B) * sum_i CE_i`` over its images (N
    ranks, B images in the global batch), so DDP's mean over the ranks is the global
    mean and an update equals one process's on the whole batch (up to float summation
    order).  The loss and accuracy sums are all-reduced at every read, so every rank sees
    the same numbers and a non-finite loss on any rank stops all of them at the same batch.
    The test accuracy is computed on the unwrapped model (``model.module``).
    """
    hooks = hooks or FitHooks()
    s = settings
    w = world()
    net = getattr(model, "module", model)  # the model itself when ``model`` is a DDP wrapper
    gen = torch.Generator(device=device)
    gen.manual_seed(s.seed)
    history, start, within = [], 0, None
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if isinstance(getattr(scheduler, "milestones", None), dict):  # saved as a plain dict
            scheduler.milestones = Counter(scheduler.milestones)
        _set_rng_state(gen, resume["rng"])
        history, start = list(resume["history"]), int(resume["epoch"])
        within = resume if resume.get("batch") else None  # a mid-epoch state (``hooks.partial``)
        if hooks.resumed:
            hooks.resumed(start)
    steps_per_epoch = math.ceil(train_size / s.batch_size)
    fits = False  # the first batch's memory is checked (an SNN: :func:`_require_memory`)
    sync_every = SYNC_EVERY.get(torch.device(device).type, 20)
    for epoch in range(start, s.epochs):
        model.train()
        t0, seen, skip, elapsed0 = time.perf_counter(), 0, 0, 0.0
        loss_dev = torch.zeros((), device=device)                     # summed on the device,
        correct_dev = torch.zeros((), dtype=torch.int64, device=device)  # read back every sync_every
        checked, loss_sum, correct = 0, 0.0, 0  # batches whose loss has been read back, and those sums
        if within is not None:  # replay the epoch's draws up to the saved batch (no training)
            gen.set_state(within["epoch_rng"])
            skip, seen, elapsed0 = int(within["batch"]), int(within["seen"]), float(within["seconds"])
            if w.main:  # (the sums are all-reduced: the saved totals count once)
                loss_dev += within["loss_sum"]
                correct_dev += int(within["correct"])
            checked, loss_sum, correct = skip, float(within["loss_sum"]), int(within["correct"])
        epoch_rng, saved_at = gen.get_state(), time.perf_counter()
        with hooks.progress(f"epoch {epoch + 1}/{s.epochs}", steps_per_epoch) as advance:
            if skip:
                advance(skip, f"resumed at batch {skip}")
            for i, (x, y) in enumerate(epoch_batches(gen)):
                if i < skip:
                    if i + 1 == skip:  # the draws of the skipped batches are replayed: now the saved ones
                        _set_rng_state(gen, within["rng"])
                        within = None
                    continue
                batch = len(y)
                if w.distributed:  # this rank's slice of the global batch
                    torch.manual_seed(_batch_seed(s.seed, epoch, i, w.rank))  # its dropout and encoder draws
                    part = shard(batch, w)
                    x, y = x[part], y[part]
                if not fits:
                    fits = _require_memory(net, len(x))
                out = model(x)
                if w.distributed:
                    loss = F.cross_entropy(out, y, label_smoothing=s.label_smoothing, reduction="sum") * (w.size / batch)
                    loss_dev += loss.detach() * (batch / w.size)  # this rank's sum of CE
                else:
                    loss = F.cross_entropy(out, y, label_smoothing=s.label_smoothing)
                    loss_dev += loss.detach() * batch
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if s.per_batch:
                    scheduler.step()
                correct_dev += (out.argmax(1) == y).sum()
                seen += batch
                if (i + 1) % sync_every == 0 or i + 1 == steps_per_epoch:
                    if w.distributed:  # every rank reads the global sums
                        both = all_reduce(torch.stack([loss_dev.double(), correct_dev.double()]))
                        loss_sum, correct = float(both[0]), int(both[1])
                    else:
                        loss_sum, correct = float(loss_dev), int(correct_dev)
                    if not math.isfinite(loss_sum):
                        where = f"batch {i + 1}" if i == checked else f"batches {checked + 1}-{i + 1}"
                        raise TrainingError(f"loss became {loss_sum} (not finite) at epoch {epoch + 1}, {where}; "
                                            f"stopped (lower the learning rate); the last completed epoch's "
                                            f"checkpoint is kept")
                    advance(i + 1 - checked, f"loss {loss_sum / seen:.3f}")
                    checked = i + 1
                    if (hooks.partial and s.save_every > 0 and i + 1 < steps_per_epoch
                            and time.perf_counter() - saved_at >= s.save_every):
                        hooks.partial({"epoch": epoch, "batch": i + 1, "epoch_rng": epoch_rng,
                                       "seen": seen, "loss_sum": loss_sum, "correct": correct,
                                       "seconds": elapsed0 + time.perf_counter() - t0,
                                       "optimizer": optimizer.state_dict(),
                                       "scheduler": _plain(scheduler.state_dict()), "rng": _rng_state(gen),
                                       "history": history})
                        saved_at = time.perf_counter()
        # (loss_sum and correct were read at the last batch)
        train_time = elapsed0 + time.perf_counter() - t0
        lr = optimizer.param_groups[0]["lr"]
        if not s.per_batch:
            scheduler.step()
        test_acc = test_accuracy(net, s.seed + epoch)
        row = {"epoch": epoch + 1, "loss": loss_sum / seen, "train_acc": 100.0 * correct / seen,
               "test_acc": test_acc, "lr": lr, "seconds": train_time, "images_per_s": seen / train_time}
        history.append(row)
        if hooks.epoch_done:
            hooks.epoch_done(row, {"epoch": epoch + 1, "optimizer": optimizer.state_dict(),
                                   "scheduler": _plain(scheduler.state_dict()), "rng": _rng_state(gen),
                                   "history": history})
    return history
