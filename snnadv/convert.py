"""``snnadv convert``: an ANN checkpoint -> an SNN-conv checkpoint (paper Sec. 2.2).

The stage around :mod:`snnadv.conversion` (which computes): it reads the ANN
checkpoint and the data, claims its outputs, balances the thresholds, measures the
accuracy-vs-T curve, prints the table and saves the converted checkpoint with
``scale`` (for fine-tuning) beside the thresholds.  Under torchrun the balancing batches
and the curve's test batches are shared out over the ranks and rank 0 writes.
"""

from __future__ import annotations

import torch

from .checkpoint import build_model, file_hash, load_checkpoint, load_weights, model_settings, save_checkpoint, weights
from .config import check_positive, resolve_device
from .conversion import ConversionSettings, accuracy_curve, balance, build_snn, spiking_layers
from .data import batches, load_dataset
from .errors import SnnadvError
from .evaluation import accuracy
from .models import ArchSpec
from .outputs import Outputs, checkpoint_paths, guarded, write_json
from .parallel import world
from .report import Reporter


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
    settings = ConversionSettings.from_config(cfg)
    ann = load_checkpoint(cfg["checkpoint"], "ann")
    spec = ArchSpec.from_dict(ann["spec"])
    cfg = {**cfg, "dataset": ann["dataset"]}
    out, metrics_path = checkpoint_paths(cfg["out"], f"snn-conv-{spec.arch}-{cfg['dataset']}-s{cfg['seed']}")
    outputs.claim([out, metrics_path], cfg, inputs={"--checkpoint": cfg["checkpoint"]})
    device = resolve_device(cfg["device"])
    torch.manual_seed(cfg["seed"])
    train, test = load_dataset(cfg["dataset"], cfg["data_dir"], device, cfg["train_subset"],
                               cfg["test_subset"], cfg["download"])
    T = settings.timesteps
    snn = build_snn(spec, settings, input_bits=ann["model"].get("input_bits"),
                    input_range=ann["model"].get("input_range", "unit"), chunk_steps=cfg.get("chunk_steps"),
                    precision=cfg.get("precision") or "fp32").to(device)
    load_weights(snn, ann["state_dict"], f"ANN checkpoint '{cfg['checkpoint']}'")
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg["seed"])
    imgs = [x for x, _ in batches(train, cfg["batch_size"], shuffle=True, generator=gen)][: settings.batches]
    layers = spiking_layers(spec, settings.balance, snn.neuron_names)
    reporter.print(f"balancing {len(layers)} of {len(snn.neuron_names)} spiking layers over T={T}, "
                   f"{len(imgs)} batch(es) of {cfg['batch_size']}, percentile {cfg['percentile']}")
    with reporter.progress("balancing thresholds", len(layers) * len(imgs)) as advance:
        thresholds = balance(snn, imgs, settings, gen, advance)
    curve_steps = sorted({int(t) for t in cfg["curve"] if int(t) <= T} | {T})
    above = [str(t) for t in cfg["curve"] if int(t) > T]
    if above:
        reporter.print(f"note: curve points above T={T} are left out ({', '.join(above)})")
    with reporter.progress(f"evaluating SNN-conv up to T={curve_steps[-1]}", len(test)) as advance:
        curve = accuracy_curve(snn, test, curve_steps, cfg.get("eval_batch_size") or cfg["batch_size"],
                               cfg["seed"], advance)
    ann_acc = accuracy(build_model(ann, device), test, cfg["batch_size"])["mean"]
    reporter.table(f"SNN-conv {spec.arch}: test accuracy (%) vs timesteps ({len(test)} test images)",
                   ["model"] + [f"T={t}" for t in curve_steps] + ["ANN"],
                   [["SNN-conv"] + [curve[t] for t in curve_steps] + [ann_acc]])
    model = {**model_settings(snn), "finetune_scale": settings.scale}
    metrics = {"test_acc": curve[T], "curve": {str(t): curve[t] for t in curve_steps},
               "ann_test_acc": ann_acc, "thresholds": thresholds}
    parent = {"path": str(cfg["checkpoint"]), "sha256": file_hash(cfg["checkpoint"])}
    if not world().main:  # under torchrun rank 0 writes
        return {"stage": "snn-conv", "checkpoint": str(out), "config": cfg, "metrics": metrics, "parent": parent}
    path = save_checkpoint(out, {"stage": "snn-conv", "dataset": cfg["dataset"], "spec": ann["spec"],
                                 "model": model, "state_dict": weights(snn), "config": cfg,
                                 "metrics": metrics, "parent": parent, "train_state": None})
    result = {"stage": "snn-conv", "checkpoint": str(path), "sha256": file_hash(path), "config": cfg,
              "metrics": metrics, "parent": parent}
    write_json(metrics_path, result)
    reporter.print(f"[green]saved[/] {path}")
    return result
