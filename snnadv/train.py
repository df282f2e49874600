"""Training: the ANN (paper Sec. 3.2) and hybrid SNN-BP fine-tuning, one loop for both.

:func:`fit` is the loop: shuffled, augmented batches from the device-resident
split; cross-entropy; per-epoch test accuracy; an atomic checkpoint after every
epoch holding everything needed to resume (optimizer, scheduler, every RNG state,
the history), so ``--resume`` gives the same result as an uninterrupted run and
Ctrl-C never costs more than the epoch in progress.  A NaN/inf loss stops the run
with a one-line error before anything is written over the last good checkpoint.

:func:`train_ann` and :func:`finetune` set up the model, optimizer and schedule
for their stage and hand over to :func:`fit`.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import build_model, file_hash, load_checkpoint, load_weights, model_settings, save_checkpoint, weights
from .config import ANN_SCHEDULE, FINETUNE_STEPS, check_cross, check_positive, resolve_device
from .data import DATASETS, batches, load_dataset, to_float
from .errors import CheckpointError, Interrupted, SnnadvError, TrainingError
from .evaluation import accuracy
from .models import ANN, get_spec
from .neurons import make_surrogate
from .outputs import Outputs, checkpoint_paths, guarded, replacing
from .report import Reporter, write_json


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


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


#: batches between reads of the running loss, per device type (see :func:`fit`)
SYNC_EVERY = {"cpu": 1, "cuda": 20}


def fit(model, train, test, *, optimizer, scheduler, epochs: int, batch_size: int, seed: int,
        checkpoint_fn, resume: dict | None = None, reporter: Reporter | None = None,
        eval_batch_size: int = 256, per_batch: bool = False, label_smoothing: float = 0.0) -> list[dict]:
    """Train ``model`` for ``epochs`` epochs; returns the per-epoch history.

    ``checkpoint_fn(train_state)`` is called after every epoch with the state to
    resume from; ``resume`` is such a state (from an interrupted run).  The
    ``scheduler`` steps after every epoch, or after every batch with ``per_batch``.

    The loss and accuracy are summed on the device and read back every
    :data:`SYNC_EVERY` batches on a GPU (every batch on a CPU, where reading is free),
    so the host does not wait for the GPU after each step.  A non-finite loss stops
    training at that read, before the epoch's checkpoint: the last completed epoch's
    checkpoint stays as it was.
    """
    reporter = reporter or Reporter(quiet=True)
    device = train.images.device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    history, start = [], 0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if isinstance(getattr(scheduler, "milestones", None), dict):  # saved as a plain dict
            scheduler.milestones = Counter(scheduler.milestones)
        _set_rng_state(gen, resume["rng"])
        history, start = list(resume["history"]), int(resume["epoch"])
        reporter.print(f"resuming after epoch {start} of {epochs}")
    steps_per_epoch = math.ceil(len(train) / batch_size)
    sync_every = SYNC_EVERY.get(device.type, 20)
    for epoch in range(start, epochs):
        model.train()
        t0, seen = time.perf_counter(), 0
        loss_dev = torch.zeros((), device=device)                     # summed on the device,
        correct_dev = torch.zeros((), dtype=torch.int64, device=device)  # read back every sync_every
        checked, loss_sum = 0, 0.0  # batches whose loss has been read back, and that sum
        with reporter.progress(f"epoch {epoch + 1}/{epochs}", steps_per_epoch) as advance:
            for i, (x, y) in enumerate(batches(train, batch_size, shuffle=True, generator=gen, train_augment=True)):
                out = model(x)
                loss = F.cross_entropy(out, y, label_smoothing=label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if per_batch:
                    scheduler.step()
                loss_dev += loss.detach() * len(y)
                correct_dev += (out.argmax(1) == y).sum()
                seen += len(y)
                if (i + 1) % sync_every == 0 or i + 1 == steps_per_epoch:
                    loss_sum = float(loss_dev)
                    if not math.isfinite(loss_sum):
                        where = f"batch {i + 1}" if i == checked else f"batches {checked + 1}-{i + 1}"
                        raise TrainingError(f"loss became {loss_sum} (not finite) at epoch {epoch + 1}, {where}; "
                                            f"stopped (lower the learning rate); the last completed epoch's "
                                            f"checkpoint is kept")
                    advance(i + 1 - checked, f"loss {loss_sum / seen:.3f}")
                    checked = i + 1
        correct = int(correct_dev)  # (loss_sum was read at the last batch)
        train_time = time.perf_counter() - t0
        lr = optimizer.param_groups[0]["lr"]
        if not per_batch:
            scheduler.step()
        test_acc = accuracy(model, test, eval_batch_size, seed=seed + epoch)["mean"]
        row = {"epoch": epoch + 1, "loss": loss_sum / seen, "train_acc": 100.0 * correct / seen,
               "test_acc": test_acc, "lr": lr, "seconds": train_time, "images_per_s": seen / train_time}
        history.append(row)
        reporter.print(f"epoch {epoch + 1:>3}/{epochs}  loss {row['loss']:.4f}  train {row['train_acc']:.2f}%  "
                       f"test {test_acc:.2f}%  lr {lr:.3g}  {row['images_per_s']:.0f} img/s")
        checkpoint_fn({"epoch": epoch + 1, "optimizer": optimizer.state_dict(),
                       "scheduler": _plain(scheduler.state_dict()), "rng": _rng_state(gen), "history": history})
    return history


def _setup(cfg: dict):
    check_positive(cfg, "epochs", "batch_size", "lr")
    if cfg["dataset"] not in DATASETS:
        raise SnnadvError(f"unknown dataset '{cfg['dataset']}' (choose {', '.join(DATASETS)})")
    device = resolve_device(cfg["device"])
    seed_everything(cfg["seed"])
    train, test = load_dataset(cfg["dataset"], cfg["data_dir"], device, cfg["train_subset"],
                               cfg["test_subset"], cfg["download"])
    return device, train, test


def _resume_state(out: Path, cfg: dict, stage: str, arch: str) -> dict | None:
    if not cfg.get("resume"):
        return None
    if not out.exists():
        raise CheckpointError(f"--resume: no checkpoint at '{out}' to resume from")
    ckpt = load_checkpoint(out, stage)
    if ckpt["spec"]["arch"] != arch or ckpt["dataset"] != cfg["dataset"]:
        raise CheckpointError(f"--resume: '{out}' holds a {ckpt['spec']['arch']} on {ckpt['dataset']}, "
                              f"not a {arch} on {cfg['dataset']}")
    if ckpt.get("train_state") is None:
        raise CheckpointError(f"--resume: '{out}' has no training state to resume from")
    done = int(ckpt["train_state"]["epoch"])
    if cfg["epochs"] < done:
        raise CheckpointError(f"--resume: '{out}' already holds {done} epochs, more than --epochs {cfg['epochs']} "
                              f"(give --epochs {done} to finish it as it is, or more to extend it)")
    return ckpt


#: settings that shape a training run's result: --resume needs the same ones
RESUME_KEYS = {"ann": ("arch", "dataset", "lr", "momentum", "weight_decay", "input_bits", "input_range", "seed",
                       "batch_size", "train_subset", "optimizer", "nesterov", "schedule", "warmup",
                       "label_smoothing", "init"),
               "snn-bp": ("dataset", "leak", "timesteps", "lr", "lr_step", "lr_gamma", "weight_decay", "seed",
                          "batch_size", "train_subset")}


def check_resume_settings(out: Path, then: dict, now: dict) -> None:
    """``--resume`` only with the settings the checkpoint was started with: one line
    listing every difference (a setting the checkpoint did not record is not compared)."""
    short = lambda v: f"{v[:12]}..." if isinstance(v, str) and len(v) == 64 else v  # noqa: E731 (a sha256)
    diff = [f"{k} differ" if isinstance(now[k], dict) and k != "surrogate"
            else f"{k} {short(then[k])} (now {short(now[k])})" for k in now if k in then and then[k] != now[k]]
    if diff:
        raise CheckpointError(f"--resume: '{out}' was started with other settings: {', '.join(diff)}; "
                              f"give the same ones to continue it, or another --out for a new run")


def _fit(out: Path, resume: dict | None, checkpoint_fn, **kw) -> list[dict]:
    """:func:`fit`, with Ctrl-C turned into :class:`Interrupted` saying which epoch is saved where."""
    saved = [int(resume["train_state"]["epoch"]) if resume else 0]

    def save(state):
        checkpoint_fn(state)
        saved[0] = state["epoch"]

    try:
        return fit(checkpoint_fn=save, resume=resume["train_state"] if resume else None, **kw)
    except Interrupted:
        raise
    except KeyboardInterrupt:
        raise Interrupted(out, saved[0], kw["epochs"]) from None


def _finish(ckpt_base: dict, history: list, out: Path, metrics_path: Path, cfg: dict,
            reporter: Reporter, extra: dict | None = None) -> dict:
    """Record the final metrics in the checkpoint and beside it as JSON."""
    final = history[-1] if history else {}
    metrics = {"test_acc": final.get("test_acc"), "train_acc": final.get("train_acc"),
               "epochs": len(history), **(extra or {}), "history": history}
    ckpt = load_checkpoint(out)
    ckpt["metrics"] = metrics
    save_checkpoint(out, {k: v for k, v in ckpt.items() if k not in ("format", "format_version", "versions")})
    result = {"stage": ckpt_base["stage"], "checkpoint": str(out), "sha256": file_hash(out),
              "config": cfg, "metrics": metrics, "versions": ckpt["versions"], "parent": ckpt_base.get("parent")}
    write_json(metrics_path, result)
    reporter.print(f"[green]saved[/] {out}  (metrics: {metrics_path})")
    return result


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


def lr_factor(cfg: dict, steps_per_epoch: int):
    """The per-batch lr multiplier of the linear/cosine schedules: a linear warm-up over
    ``warmup`` epochs, then decay to 0 at the end of each cycle. ``lr_restarts`` (epochs) start
    new cycles (warm restarts, SGDR-style without warm-up), the k-th at ``lr_restart_peak**k``
    of the peak lr; without restarts the run is one cycle."""
    bounds = [0, *(r * steps_per_epoch for r in cfg.get("lr_restarts") or []), cfg["epochs"] * steps_per_epoch]
    warm, peak = round(cfg["warmup"] * steps_per_epoch), cfg.get("lr_restart_peak", 0.5)

    def factor(step: int) -> float:
        k = max(i for i in range(len(bounds) - 1) if bounds[i] <= step or i == 0)
        start, end = bounds[k] + (warm if k == 0 else 0), bounds[k + 1]
        if k == 0 and step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - start) / max(1, end - start))
        return peak ** k * (1.0 - t if cfg["schedule"] == "linear" else 0.5 * (1.0 + math.cos(math.pi * t)))

    return factor


def check_same_schedule(out: Path, then: dict, now: dict, done: int, steps_per_epoch: int) -> None:
    """``--resume`` may extend a linear/cosine run only where the lr of the epochs already
    trained stays what it was (e.g. a restart at the epoch where the first run ended);
    lengthening the decay itself would change the past and jump the lr."""
    if now["schedule"] == "step" or then.get("epochs") is None:
        return
    then = {**now, **{k: then[k] for k in ("epochs", "warmup", "lr_restarts", "lr_restart_peak") if k in then},
            "lr_restarts": then.get("lr_restarts") or []}
    f0, f1 = lr_factor(then, steps_per_epoch), lr_factor(now, steps_per_epoch)
    if any(abs(f0(s) - f1(s)) > 1e-12 for s in range(done * steps_per_epoch)):
        raise CheckpointError(f"--resume: '{out}' decayed its lr to its end at epoch {then['epochs']}; extending "
                              f"it to {now['epochs']} epochs would change the lr of the {done} epochs done (give "
                              f"lr_restarts = [{done}] to start a new cycle there, or another --out for a new run)")


def _ann_schedule(cfg: dict, opt: torch.optim.Optimizer, steps_per_epoch: int):
    """The paper's step schedule (per epoch), or the per-batch :func:`lr_factor` schedule."""
    if cfg["schedule"] == "step":
        return torch.optim.lr_scheduler.MultiStepLR(opt, cfg["milestones"], 0.1)
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, steps_per_epoch))


@guarded
def train_ann(cfg: dict, reporter: Reporter | None = None, outputs: Outputs | None = None) -> dict:
    """Train an ANN: the paper's recipe (SGD, momentum, step schedule) by default, or the
    faster one of ``configs/vgg5_cifar10_cpu.toml`` (LSUV init, AdamW, warm-up and a
    per-batch linear decay; see the ``train-ann`` settings in :mod:`snnadv.config`).

    The checkpoint at ``--out`` is claimed first (:mod:`snnadv.outputs`: not an input,
    writable, not an existing result without ``resume``/``overwrite``, locked).
    """
    reporter = reporter or Reporter(quiet=cfg.get("quiet", False))
    epochs0, lr0, milestones0 = ANN_SCHEDULE.get(cfg["arch"], ANN_SCHEDULE["vgg5"])
    cfg = {**cfg, "epochs": epochs0 if cfg["epochs"] is None else cfg["epochs"],
           "lr": lr0 if cfg["lr"] is None else cfg["lr"]}
    check_positive(cfg, "epochs", "lr")
    check_cross(cfg)
    given = {k: cfg[k] for k in RESUME_KEYS["ann"] + (("milestones",) if cfg["milestones"] is not None else ())}
    if cfg["milestones"] is None:  # scale the paper's milestones to a shorter run (never epoch 0)
        cfg["milestones"] = [max(1, round(m * cfg["epochs"] / epochs0)) for m in milestones0]
    spec = get_spec(cfg["arch"], DATASETS.get(cfg["dataset"], 10))
    out, metrics_path = checkpoint_paths(cfg["out"], f"ann-{cfg['arch']}-{cfg['dataset']}-s{cfg['seed']}")
    outputs.claim([out, metrics_path], cfg, resumable=True)
    device, train, test = _setup(cfg)
    resume = _resume_state(out, cfg, "ann", cfg["arch"])
    steps_per_epoch = math.ceil(len(train) / cfg["batch_size"])
    if resume:
        check_resume_settings(out, resume.get("config") or {}, given)
        check_same_schedule(out, resume.get("config") or {}, cfg, int(resume["train_state"]["epoch"]),
                            steps_per_epoch)
    model = ANN(spec, cfg["input_bits"], cfg["input_range"], precision=cfg.get("precision") or "fp32").to(device)
    if resume:
        load_weights(model, resume["state_dict"], f"--resume: '{out}'")
    elif cfg["init"] == "lsuv":
        lsuv_init(model, to_float(train.images[torch.randperm(len(train), device=device)[:512]]))
    if cfg["channels_last"]:  # 2x faster convolutions on a CPU (oneDNN), same results
        model = model.to(memory_format=torch.channels_last)
    if cfg["optimizer"] == "adamw":
        opt = make_optimizer(torch.optim.AdamW, model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    else:
        opt = make_optimizer(torch.optim.SGD, model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                             nesterov=cfg["nesterov"], weight_decay=cfg["weight_decay"])
    sched = _ann_schedule(cfg, opt, steps_per_epoch)
    base = {"stage": "ann", "dataset": cfg["dataset"], "spec": spec.to_dict(), "config": cfg}
    reporter.print(f"training ANN {cfg['arch']} on {cfg['dataset']} ({len(train)} train / {len(test)} test, "
                   f"{device}) for {cfg['epochs']} epochs")

    @replacing(stale=[] if resume else [metrics_path])
    def checkpoint_fn(state):
        save_checkpoint(out, {**base, "model": model_settings(model), "state_dict": weights(model),
                              "metrics": {"history": state["history"]}, "train_state": state})

    history = _fit(out, resume, checkpoint_fn, model=model, train=train, test=test, optimizer=opt,
                   scheduler=sched, epochs=cfg["epochs"], batch_size=cfg["batch_size"], seed=cfg["seed"],
                   reporter=reporter, per_batch=cfg["schedule"] != "step",
                   label_smoothing=cfg["label_smoothing"])
    return _finish(base, history, out, metrics_path, cfg, reporter)


@guarded
def finetune(cfg: dict, reporter: Reporter | None = None, outputs: Outputs | None = None) -> dict:
    """Hybrid SNN-BP training (Sec. 3.2): BPTT from a converted SNN, thresholds fixed."""
    reporter = reporter or Reporter(quiet=cfg.get("quiet", False))
    if cfg["checkpoint"] is None:
        raise SnnadvError("finetune needs --checkpoint: an snn-conv checkpoint from 'snnadv convert'")
    if not 0.0 < float(cfg["leak"]) <= 1.0:
        raise SnnadvError(f"leak must be in (0, 1], got {cfg['leak']}")
    check_positive(cfg, "timesteps", "alpha", "gamma", "lr_step")
    parent = load_checkpoint(cfg["checkpoint"], ("snn-conv", "snn-bp"))
    arch = parent["spec"]["arch"]
    cfg = {**cfg, "dataset": parent["dataset"], "timesteps": cfg["timesteps"] or FINETUNE_STEPS.get(arch, 100)}
    out, metrics_path = checkpoint_paths(cfg["out"], f"snn-bp-{arch}-{cfg['dataset']}-s{cfg['seed']}")
    outputs.claim([out, metrics_path], cfg, inputs={"--checkpoint": cfg["checkpoint"]}, resumable=True)
    scale = cfg["scale"] if cfg["scale"] is not None else (
        parent["model"].get("finetune_scale", 1.0) if parent["stage"] == "snn-conv" else 1.0)
    device, train, test = _setup(cfg)
    sur = make_surrogate(cfg["surrogate"], alpha=cfg["alpha"], beta=cfg["beta"], gamma=cfg["gamma"])
    model = build_model(parent, device, num_steps=cfg["timesteps"], leak=float(cfg["leak"]),
                        surrogate={"name": sur.name, **sur.params()}, precision=cfg.get("precision"))
    model.set_thresholds({k: v * scale for k, v in model.thresholds().items()})
    model.kind = "snn-bp"
    resume = _resume_state(out, cfg, "snn-bp", arch)
    if resume:
        then = {**{k: resume["config"].get(k) for k in RESUME_KEYS["snn-bp"] if k in (resume.get("config") or {})},
                "checkpoint": (resume.get("parent") or {}).get("sha256"),
                "surrogate": resume["model"].get("surrogate"), "thresholds (scale)": resume["model"].get("thresholds")}
        check_resume_settings(out, then, {**{k: cfg[k] for k in RESUME_KEYS["snn-bp"]},
                                          "checkpoint": file_hash(cfg["checkpoint"]),
                                          "surrogate": model_settings(model)["surrogate"],
                                          "thresholds (scale)": model.thresholds()})
        load_weights(model, resume["state_dict"], f"--resume: '{out}'")
    opt = make_optimizer(torch.optim.Adam, model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.StepLR(opt, cfg["lr_step"], cfg["lr_gamma"])
    base = {"stage": "snn-bp", "dataset": cfg["dataset"], "spec": parent["spec"], "config": cfg,
            "parent": {"path": str(cfg["checkpoint"]), "sha256": file_hash(cfg["checkpoint"])}}
    # accuracy of the starting point (kept from the first run when resuming)
    before = (resume["metrics"].get("test_acc_before") if resume else None)
    if before is None:
        start = build_model(parent, device, num_steps=cfg["timesteps"], leak=float(cfg["leak"]),
                            precision=cfg.get("precision"))
        start.set_thresholds({k: v * scale for k, v in start.thresholds().items()})
        before = accuracy(start, test, cfg["batch_size"], seed=cfg["seed"])["mean"]
    reporter.print(f"fine-tuning SNN-BP {arch} (T={cfg['timesteps']}, leak={cfg['leak']}, "
                   f"surrogate={sur!r}, thresholds x{scale}) on {len(train)} images, {device}; "
                   f"test accuracy before: {before:.2f}%")

    @replacing(stale=[] if resume else [metrics_path])
    def checkpoint_fn(state):
        save_checkpoint(out, {**base, "model": model_settings(model), "state_dict": weights(model),
                              "metrics": {"history": state["history"], "test_acc_before": before},
                              "train_state": state})

    history = _fit(out, resume, checkpoint_fn, model=model, train=train, test=test, optimizer=opt,
                   scheduler=sched, epochs=cfg["epochs"], batch_size=cfg["batch_size"], seed=cfg["seed"],
                   reporter=reporter, eval_batch_size=cfg["batch_size"])
    return _finish(base, history, out, metrics_path, cfg, reporter, {"test_acc_before": before})
