"""ANN -> SNN conversion by threshold balancing (paper Sec. 2.2; Sengupta et al. 2019).

The converted network (SNN-conv) keeps the ANN's weights and replaces every ReLU by
an IF neuron (leak 1, soft reset).  Thresholds are balanced one spiking layer after
another: with the thresholds found so far in place, the IF network is run on
rate-encoded training images for T steps, and the next layer's threshold is the
maximum (default) or a chosen percentile of its *input current* (the term
sum_i w_i x_i(t) of Eq. 3) over all timesteps, neurons and N training batches.
The output layer has no threshold.

The percentile is exact: :class:`TopK` keeps the k largest values of the stream
(k = the number of values above the percentile), so no histogram binning error.
For ResNets the original code balanced only the stem and left the residual
layers at 1.0; that is ``balance="stem"`` here, and the default ``"all"`` balances
every spiking layer.

The thresholds are saved as found; ``scale`` (0.7 in the original code) is stored
beside them and applied by fine-tuning, which starts from the scaled thresholds.
"""

from __future__ import annotations

import math

import torch

from .checkpoint import build_model, file_hash, load_checkpoint, load_weights, model_settings, save_checkpoint, weights
from .config import check_positive, resolve_device
from .data import batches, load_dataset
from .errors import SnnadvError
from .evaluation import accuracy
from .models import SNN, ArchSpec
from .models.spec import Block
from .outputs import Outputs, checkpoint_paths, guarded
from .report import Reporter, write_json


class _Stop(Exception):
    """Raised by the recording hook once the layer being balanced has its input."""


class TopK:
    """The exact ``percentile`` of a stream of ``total`` values, keeping only the top k."""

    def __init__(self, percentile: float, total: int):
        self.k = max(1, math.ceil((1.0 - percentile / 100.0) * total))
        self.values = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().flatten().float()
        if self.values is not None and len(self.values) >= self.k:
            x = x[x > self.values.min()]  # cannot enter the top k
            x = torch.cat([self.values, x])
        elif self.values is not None:
            x = torch.cat([self.values, x])
        if len(x) > self.k:
            x = torch.topk(x, self.k, sorted=False).values
        self.values = x

    def value(self) -> float:
        return float(self.values.min()) if len(self.values) >= self.k else float(self.values.max())


def balance_thresholds(snn: SNN, images: list[torch.Tensor], num_steps: int, percentile: float = 100.0,
                       layers: list[str] | None = None, reporter: Reporter | None = None,
                       generator: torch.Generator | None = None) -> dict[str, float]:
    """Balance the thresholds of ``snn`` (in place, layer by layer); returns them.

    ``images``: the training batches (float, [0, 1]) to balance on.  ``layers``: the
    spiking layers to balance (default all); the others keep their threshold.
    """
    reporter = reporter or Reporter(quiet=True)
    names = snn.neuron_names
    layers = names if layers is None else layers
    mods = dict(snn.named_modules())
    was_training = snn.training
    snn.eval()
    snn.encoder.generator = generator
    per_batch = num_steps * len(images)
    try:
        with reporter.progress("balancing thresholds", len(layers) * len(images)) as advance:
            for name in layers:
                neuron = mods[name]
                tracker = None

                def hook(current, _n=neuron):
                    nonlocal tracker
                    if tracker is None:
                        total = current[0].numel() * per_batch
                        tracker = TopK(percentile, total)
                    tracker.add(current)
                    raise _Stop

                # the hook stops the forward at this layer's input: run chunk by chunk
                neuron.current_hook = hook
                with torch.no_grad():
                    for x in images:
                        _run_until_stopped(snn, x, num_steps)
                        advance(1, f"{name}")
                neuron.current_hook = None
                thr = tracker.value()
                if not thr > 0:
                    raise SnnadvError(f"layer {name} received no positive input during balancing "
                                      f"(threshold {thr}); the ANN may be untrained")
                neuron.set_threshold(thr)
    finally:
        for n in snn.neurons:
            n.current_hook = None
        snn.encoder.generator = None
        snn.train(was_training)
    return snn.thresholds()


def _run_until_stopped(snn: SNN, x: torch.Tensor, num_steps: int) -> None:
    """Run ``snn`` for ``num_steps`` steps; the balancing hook ends each chunk early.

    The neurons before the balanced layer must still see every timestep, so the run
    goes chunk by chunk (``snn.chunk_steps``) and each chunk is stopped at the
    balanced layer, its upstream state carried to the next chunk.
    """
    snn.reset_state()
    chunk = snn.chunk_for(x.shape[0], num_steps, x.device.type)
    t0 = 0
    while t0 < num_steps:
        n = min(chunk, num_steps - t0)
        h = snn.encoder(x, n)
        try:
            for name in snn._hidden:
                h = snn._layer(getattr(snn, name), h)
        except _Stop:
            pass
        t0 += n


def spiking_layers(spec: ArchSpec, balance: str, names: list[str]) -> list[str]:
    """Which spiking layers to balance: ``all``, or ``stem`` (the non-residual ones)."""
    if balance == "all":
        return names
    if balance == "stem":
        blocks = {l.name for l in spec.layers if isinstance(l, Block)}
        return [n for n in names if n.split(".")[0] not in blocks]
    raise SnnadvError(f"unknown balance mode '{balance}' (choose all or stem)")


@guarded
def convert(cfg: dict, reporter: Reporter | None = None, outputs: Outputs | None = None) -> dict:
    """``snnadv convert``: ANN checkpoint -> snn-conv checkpoint, with the accuracy-vs-T curve.

    The output (``--out``: a ``.pt`` file, or a folder) is claimed before any work
    (:mod:`snnadv.outputs`)."""
    reporter = reporter or Reporter(quiet=cfg.get("quiet", False))
    if cfg["checkpoint"] is None:
        raise SnnadvError("convert needs --checkpoint: an ANN checkpoint from 'snnadv train-ann'")
    check_positive(cfg, "timesteps", "batches", "batch_size", "scale")
    if not 0.0 < float(cfg["percentile"]) <= 100.0:
        raise SnnadvError(f"percentile must be in (0, 100], got {cfg['percentile']}")
    ann = load_checkpoint(cfg["checkpoint"], "ann")
    spec = ArchSpec.from_dict(ann["spec"])
    cfg = {**cfg, "dataset": ann["dataset"]}
    out, metrics_path = checkpoint_paths(cfg["out"], f"snn-conv-{spec.arch}-{cfg['dataset']}-s{cfg['seed']}")
    outputs.claim([out, metrics_path], cfg, inputs={"--checkpoint": cfg["checkpoint"]})
    device = resolve_device(cfg["device"])
    torch.manual_seed(cfg["seed"])
    train, test = load_dataset(cfg["dataset"], cfg["data_dir"], device, cfg["train_subset"],
                               cfg["test_subset"], cfg["download"])
    T = int(cfg["timesteps"])
    snn = SNN(spec, num_steps=T, leak=1.0, reset="subtract", input_bits=ann["model"].get("input_bits"),
              input_range=ann["model"].get("input_range", "unit"), chunk_steps=cfg.get("chunk_steps"),
              precision=cfg.get("precision") or "fp32").to(device)
    load_weights(snn, ann["state_dict"], f"ANN checkpoint '{cfg['checkpoint']}'")
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg["seed"])
    imgs = [x for x, _ in batches(train, cfg["batch_size"], shuffle=True, generator=gen)][: int(cfg["batches"])]
    layers = spiking_layers(spec, cfg["balance"], snn.neuron_names)
    reporter.print(f"balancing {len(layers)} of {len(snn.neuron_names)} spiking layers over T={T}, "
                   f"{len(imgs)} batch(es) of {cfg['batch_size']}, percentile {cfg['percentile']}")
    thresholds = balance_thresholds(snn, imgs, T, float(cfg["percentile"]), layers, reporter, gen)
    curve_steps = sorted({int(t) for t in cfg["curve"] if int(t) <= T} | {T})
    above = [str(t) for t in cfg["curve"] if int(t) > T]
    if above:
        reporter.print(f"note: curve points above T={T} are left out ({', '.join(above)})")
    curve = accuracy_curve(snn, test, curve_steps, cfg.get("eval_batch_size") or cfg["batch_size"],
                           cfg["seed"], reporter)
    ann_acc = accuracy(build_model(ann, device), test, cfg["batch_size"])["mean"]
    reporter.table(f"SNN-conv {spec.arch}: test accuracy (%) vs timesteps ({len(test)} test images)",
                   ["model"] + [f"T={t}" for t in curve_steps] + ["ANN"],
                   [["SNN-conv"] + [curve[t] for t in curve_steps] + [ann_acc]])
    settings = {**model_settings(snn), "finetune_scale": float(cfg["scale"])}
    metrics = {"test_acc": curve[T], "curve": {str(t): curve[t] for t in curve_steps},
               "ann_test_acc": ann_acc, "thresholds": thresholds}
    parent = {"path": str(cfg["checkpoint"]), "sha256": file_hash(cfg["checkpoint"])}
    path = save_checkpoint(out, {"stage": "snn-conv", "dataset": cfg["dataset"], "spec": ann["spec"],
                                 "model": settings, "state_dict": weights(snn), "config": cfg,
                                 "metrics": metrics, "parent": parent, "train_state": None})
    result = {"stage": "snn-conv", "checkpoint": str(path), "sha256": file_hash(path), "config": cfg,
              "metrics": metrics, "parent": parent}
    write_json(metrics_path, result)
    reporter.print(f"[green]saved[/] {path}")
    return result


@torch.no_grad()
def accuracy_curve(snn: SNN, split, steps: list[int], batch_size: int, seed: int,
                   reporter: Reporter | None = None) -> dict[int, float]:
    """Test accuracy (%) after each of ``steps`` timesteps, from one run per batch."""
    reporter = reporter or Reporter(quiet=True)
    snn.eval()
    gen = torch.Generator(device=split.images.device)
    gen.manual_seed(seed)
    snn.encoder.generator = gen
    correct = torch.zeros(len(steps), device=split.images.device)  # no host sync per batch
    try:
        with reporter.progress(f"evaluating SNN-conv up to T={steps[-1]}", len(split)) as advance:
            for x, y in batches(split, batch_size, shuffle=False):
                logits = snn.forward_curve(x, steps)
                correct += (logits.argmax(-1) == y).sum(-1).float()
                advance(len(y))
    finally:
        snn.encoder.generator = None
    return {t: 100.0 * c / len(split) for t, c in zip(steps, correct.tolist())}
