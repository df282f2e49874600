"""The training stages: ``snnadv train-ann`` (paper Sec. 3.2) and ``snnadv finetune`` (SNN-BP).

Each stage resolves its settings into the typed recipes of :mod:`snnadv.training`,
claims its outputs (:mod:`snnadv.outputs`), loads the data, builds the model and
hands over to :func:`snnadv.training.fit`, which reports back after every epoch: the
stage prints the epoch's line and writes an atomic checkpoint holding everything
needed to resume (optimizer, scheduler, every RNG state, the history), so
``--resume`` gives the same result as an uninterrupted run and Ctrl-C never costs
more than the epoch in progress.  A NaN/inf loss stops the run with a one-line
error before anything is written over the last good checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch

from .checkpoint import build_model, file_hash, load_checkpoint, load_weights, model_settings, save_checkpoint, weights
from .config import ANN_SCHEDULE, FINETUNE_STEPS, check_cross, check_positive, resolve_device
from .data import DATASETS, batches, load_dataset, to_float
from .errors import CheckpointError, Interrupted, SnnadvError
from .evaluation import accuracy
from .models import ANN, get_spec
from .surrogates import make_surrogate
from .outputs import Outputs, checkpoint_paths, guarded, replacing, write_json
from .parallel import world
from .report import Reporter
from .training import AnnRecipe, FinetuneRecipe, FitHooks, FitSettings, fit, lr_factor, lsuv_init


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


def _setup(cfg: dict):
    check_positive(cfg, "epochs", "batch_size", "lr")
    w = world()
    if cfg["batch_size"] % w.size:
        raise SnnadvError(f"--batch-size {cfg['batch_size']} does not divide over {w.size} ranks: the batch size is "
                          f"the global one and each rank takes batch-size / {w.size} images (give a multiple of {w.size})")
    if cfg["dataset"] not in DATASETS:
        raise SnnadvError(f"unknown dataset '{cfg['dataset']}' (choose {', '.join(DATASETS)})")
    device = resolve_device(cfg["device"])
    seed_everything(cfg["seed"])
    train, test = load_dataset(cfg["dataset"], cfg["data_dir"], device, cfg["train_subset"],
                               cfg["test_subset"], cfg["download"])
    return device, train, test


def partial_path(out: Path) -> Path:
    """Where a training run keeps its mid-epoch state (``bp.pt`` -> ``bp.partial.pt``):
    written every ``save_every`` minutes within an epoch, removed once the epoch's own
    checkpoint is saved; ``--resume`` continues from it."""
    return out.with_name(f"{out.stem}.partial{out.suffix}")


def _resume_state(out: Path, cfg: dict, stage: str, arch: str) -> dict | None:
    if not cfg.get("resume"):
        return None
    ckpt = load_checkpoint(out, stage) if out.exists() else None
    part = partial_path(out)
    if part.exists():  # a mid-epoch state of the epoch after the checkpoint's (else stale: ignored)
        within = load_checkpoint(part, stage)
        if ckpt is None or ckpt.get("train_state") is None or \
                int(within["train_state"]["epoch"]) >= int(ckpt["train_state"]["epoch"]):
            ckpt = within
    if ckpt is None:
        raise CheckpointError(f"--resume: no checkpoint at '{out}' to resume from")
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


def _fit(out: Path, resume: dict | None, save, payload, model, train, test, settings: FitSettings,
         reporter: Reporter, **kw) -> list[dict]:
    """:func:`snnadv.training.fit` on the ``train`` and ``test`` splits: every epoch's line
    printed, its state saved with ``save(state)``; Ctrl-C turned into :class:`Interrupted`
    saying which epoch is saved where.  Within an epoch, every ``settings.save_every``
    seconds, ``payload(state)`` goes to :func:`partial_path` (removed after the epoch).

    Under torchrun (:mod:`snnadv.parallel`) the model is wrapped in
    DistributedDataParallel with ``broadcast_buffers=False`` (a neuron's state is its
    own rank's, reset every batch, never rank 0's), and only rank 0 prints and writes."""
    saved = [int(resume["train_state"]["epoch"]) if resume else 0]
    main = world().main

    def epoch_done(row: dict, state: dict) -> None:
        reporter.print(f"epoch {row['epoch']:>3}/{settings.epochs}  loss {row['loss']:.4f}  "
                       f"train {row['train_acc']:.2f}%  test {row['test_acc']:.2f}%  lr {row['lr']:.3g}  "
                       f"{row['images_per_s']:.0f} img/s")
        if main:
            save(state)
            partial_path(out).unlink(missing_ok=True)  # superseded by the epoch's checkpoint
        saved[0] = state["epoch"]

    def partial(state: dict) -> None:
        if main:
            save_checkpoint(partial_path(out), payload(state))

    hooks = FitHooks(progress=reporter.progress, epoch_done=epoch_done, partial=partial,
                     resumed=lambda done: reporter.print(f"resuming after epoch {done} of {settings.epochs}"))
    net = _distributed(model, train.images.device)
    try:
        return fit(net, lambda gen: batches(train, settings.batch_size, shuffle=True, generator=gen,
                                              train_augment=True),
                   lambda m, seed: accuracy(m, test, settings.eval_batch_size, seed=seed)["mean"],
                   settings=settings, train_size=len(train), device=train.images.device,
                   resume=resume["train_state"] if resume else None, hooks=hooks, **kw)
    except Interrupted:
        raise
    except KeyboardInterrupt:
        raise Interrupted(out, saved[0], settings.epochs) from None


def _distributed(model, device):
    """``model`` in DistributedDataParallel under torchrun (``model`` itself otherwise)."""
    if not world().distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    import warnings

    device = torch.device(device)
    with warnings.catch_warnings():  # newer PyTorch deprecates the flag, but its successor still syncs at init
        warnings.filterwarnings("ignore", message=".*broadcast_buffers", category=FutureWarning)
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       broadcast_buffers=False)


def _finish(ckpt_base: dict, history: list, out: Path, metrics_path: Path, cfg: dict,
            reporter: Reporter, extra: dict | None = None) -> dict:
    """Record the final metrics in the checkpoint and beside it as JSON (rank 0)."""
    final = history[-1] if history else {}
    metrics = {"test_acc": final.get("test_acc"), "train_acc": final.get("train_acc"),
               "epochs": len(history), **(extra or {}), "history": history}
    if not world().main:  # the other ranks: the same numbers, nothing written
        return {"stage": ckpt_base["stage"], "checkpoint": str(out), "config": cfg, "metrics": metrics,
                "parent": ckpt_base.get("parent")}
    ckpt = load_checkpoint(out)
    ckpt["metrics"] = metrics
    save_checkpoint(out, {k: v for k, v in ckpt.items() if k not in ("format", "format_version", "versions")})
    result = {"stage": ckpt_base["stage"], "checkpoint": str(out), "sha256": file_hash(out),
              "config": cfg, "metrics": metrics, "versions": ckpt["versions"], "parent": ckpt_base.get("parent")}
    write_json(metrics_path, result)
    reporter.print(f"[green]saved[/] {out}  (metrics: {metrics_path})")
    return result


def check_same_schedule(out: Path, then: dict, now: AnnRecipe, done: int, steps_per_epoch: int) -> None:
    """``--resume`` may extend a linear/cosine run only where the lr of the epochs already
    trained stays what it was (e.g. a restart at the epoch where the first run ended);
    lengthening the decay itself would change the past and jump the lr.  ``then``: the
    settings the checkpoint was started with."""
    if now.schedule == "step" or then.get("epochs") is None:
        return
    was = replace(now, **{k: then[k] for k in ("epochs", "warmup", "lr_restart_peak") if k in then},
                  lr_restarts=tuple(then.get("lr_restarts") or ()))
    f0, f1 = lr_factor(was, steps_per_epoch), lr_factor(now, steps_per_epoch)
    if any(abs(f0(s) - f1(s)) > 1e-12 for s in range(done * steps_per_epoch)):
        raise CheckpointError(f"--resume: '{out}' decayed its lr to its end at epoch {was.epochs}; extending "
                              f"it to {now.epochs} epochs would change the lr of the {done} epochs done (give "
                              f"lr_restarts = [{done}] to start a new cycle there, or another --out for a new run)")


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
    recipe = AnnRecipe.of(cfg)
    spec = get_spec(cfg["arch"], DATASETS.get(cfg["dataset"], 10))
    out, metrics_path = checkpoint_paths(cfg["out"], f"ann-{cfg['arch']}-{cfg['dataset']}-s{cfg['seed']}")
    outputs.claim([out, metrics_path, partial_path(out)], cfg, resumable=True, replace=[out, partial_path(out)])
    device, train, test = _setup(cfg)
    resume = _resume_state(out, cfg, "ann", cfg["arch"])
    steps_per_epoch = math.ceil(len(train) / cfg["batch_size"])
    if resume:
        check_resume_settings(out, resume.get("config") or {}, given)
        check_same_schedule(out, resume.get("config") or {}, recipe, int(resume["train_state"]["epoch"]),
                            steps_per_epoch)
    model = ANN(spec, cfg["input_bits"], cfg["input_range"], precision=cfg.get("precision") or "fp32").to(device)
    if resume:
        load_weights(model, resume["state_dict"], f"--resume: '{out}'")
    elif recipe.init == "lsuv":
        lsuv_init(model, to_float(train.images[torch.randperm(len(train), device=device)[:512]]))
    if cfg["channels_last"]:  # 2x faster convolutions on a CPU (oneDNN), same results
        model = model.to(memory_format=torch.channels_last)
    opt = recipe.make_optimizer(model.parameters())
    sched = recipe.make_scheduler(opt, steps_per_epoch)
    base = {"stage": "ann", "dataset": cfg["dataset"], "spec": spec.to_dict(), "config": cfg}
    reporter.print(f"training ANN {cfg['arch']} on {cfg['dataset']} ({len(train)} train / {len(test)} test, "
                   f"{device}) for {cfg['epochs']} epochs")

    def payload(state):
        return {**base, "model": model_settings(model), "state_dict": weights(model),
                "metrics": {"history": state["history"]}, "train_state": state}

    @replacing(stale=[] if resume else [metrics_path])
    def checkpoint_fn(state):
        save_checkpoint(out, payload(state))

    settings = FitSettings(recipe.epochs, cfg["batch_size"], cfg["seed"], per_batch=recipe.per_batch,
                           label_smoothing=recipe.label_smoothing, save_every=60.0 * cfg.get("save_every", 0.0))
    history = _fit(out, resume, checkpoint_fn, payload, model, train, test, settings, reporter, optimizer=opt,
                   scheduler=sched)
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
    outputs.claim([out, metrics_path, partial_path(out)], cfg, inputs={"--checkpoint": cfg["checkpoint"]},
                  resumable=True, replace=[out, partial_path(out)])
    scale = cfg["scale"] if cfg["scale"] is not None else (
        parent["model"].get("finetune_scale", 1.0) if parent["stage"] == "snn-conv" else 1.0)
    device, train, test = _setup(cfg)
    sur = make_surrogate(cfg["surrogate"], alpha=cfg["alpha"], beta=cfg["beta"], gamma=cfg["gamma"])
    model = build_model(parent, device, num_steps=cfg["timesteps"], leak=float(cfg["leak"]),
                        surrogate={"name": sur.name, **sur.params()}, precision=cfg.get("precision"), kind="snn-bp")
    model.set_thresholds({k: v * scale for k, v in model.thresholds().items()})
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
    recipe = FinetuneRecipe.of(cfg)
    opt = recipe.make_optimizer(model.parameters())
    sched = recipe.make_scheduler(opt)
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

    def payload(state):
        return {**base, "model": model_settings(model), "state_dict": weights(model),
                "metrics": {"history": state["history"], "test_acc_before": before}, "train_state": state}

    @replacing(stale=[] if resume else [metrics_path])
    def checkpoint_fn(state):
        save_checkpoint(out, payload(state))

    settings = FitSettings(recipe.epochs, cfg["batch_size"], cfg["seed"], eval_batch_size=cfg["batch_size"],
                           save_every=60.0 * cfg.get("save_every", 0.0))
    history = _fit(out, resume, checkpoint_fn, payload, model, train, test, settings, reporter, optimizer=opt,
                   scheduler=sched)
    return _finish(base, history, out, metrics_path, cfg, reporter, {"test_acc_before": before})
