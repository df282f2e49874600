"""How an adversarial perturbation passes a ReLU and an LIF neuron (paper Fig. 4).

A clean test image x (pixels in [0, 1]) and its adversarial version x_adv are fed,
pixel by pixel, to

* a ReLU: ReLU(x_adv) - ReLU(x) = x_adv - x wherever both are >= 0, which is every
  pixel of an image in [0, 1]: the perturbation passes unchanged (same l2 norm);
* an LIF neuron layer (one neuron per pixel, leak ``leak`` = 0.99 as in the paper,
  threshold ``threshold`` = 1.0, reset to zero by default: Eq. 3's reset, also the
  one Eq. 7 assumes), run for T steps; its output is the time-averaged spike
  train (a rate in [0, 1]).  Two ways of driving it are reported:

  - ``lif`` (spike input, the default view): the image is rate-encoded first
    (:class:`RateEncoder`), as in the networks.  Clean and adversarial images use
    the *same* encoder draws (the same generator seed), so the output difference
    is due to the input alone: an input spike differs only where the uniform draw
    falls between x and x_adv.  The time-averaged encoded difference is itself
    noisy, E[d^2] = delta^2 + |delta| (1 - |delta|) / T per pixel, so it is
    reported too (``encoded``).  With threshold 1.0, a hard reset and binary input
    spikes the neuron needs two input spikes per output spike (it fires when the
    membrane *exceeds* the threshold): its rate is about half the input's, a
    coarser, "low-pixel" version of the image;
  - ``lif_current`` (analog input): the pixel value itself is the input current
    at every step (deterministic; with a hard reset the rate is Eq. 7's staircase
    1/ceil(n(x)), so a perturbation that crosses a step changes the output a lot).

Part of any reduction is plain gain (an output rate of about x / 2 halves every
difference), so the relative norm ||difference|| / ||clean output|| is reported
beside the absolute one.  With the soft reset (``--reset subtract``) and threshold
1.0 the neuron passes almost every input spike after the first two, and the
perturbation is not reduced: the result depends on these choices, which the JSON
records.

The l2 norm of the output difference is reported for each, beside the input's.
The adversarial image is FGSM/PGD crafted on a given ANN checkpoint
(``--checkpoint``; the image's true label, the paper's eps = 8/255), or, without a
checkpoint, a random sign perturbation x + eps sign(N(0, 1)) clipped to [0, 1]
(seeded), which has the same L-inf budget but no adversarial direction.
"""

from __future__ import annotations

import torch

from ..attacks import check_eps, make_attack, parse_eps, takes
from ..config import STAGES as CONFIG_STAGES
from ..data import load_split, to_float
from ..encoding import RateEncoder
from ..errors import SnnadvError
from ..gradients import make_gradient
from ..neurons import LIF, RESETS
from ..registry import ATTACKS
from ..report import Reporter
from .common import int_list, recorded_settings, run_dir, table, versions, write_outputs

NAME = "perturbation"
#: the settings recorded in the result
KEYS = ("checkpoint", "attack", "eps", "alpha", "steps", "random_start", "image", "timesteps",
        "leak", "threshold", "reset", "seed", "data_dir", "dataset", "test_subset")
STAGES = ("input", "relu", "encoded", "lif", "lif_current")
LABELS = {"input": "input", "relu": "ReLU", "encoded": "rate-encoded input", "lif": "LIF (spike input)",
          "lif_current": "LIF (current input)"}


@torch.no_grad()
def lif_rate(frames: torch.Tensor, leak: float, threshold: float, reset: str) -> torch.Tensor:
    """Time-averaged spikes of one LIF neuron per element of ``frames`` [T, ...]."""
    neuron = LIF(leak=leak, threshold=threshold, reset=reset)
    neuron.reset_state()
    return neuron.multistep(frames.float().contiguous()).mean(0)


@torch.no_grad()
def perturbation_norms(x: torch.Tensor, x_adv: torch.Tensor, timesteps: int = 100, leak: float = 0.99,
                       threshold: float = 1.0, reset: str = "zero", seed: int = 0) -> dict:
    """Outputs of input / ReLU / LIF for clean and adversarial images, and the perturbation norms.

    Returns ``{"outputs": {stage: (clean, adv)}, "l2": {stage: float}, "relative_l2": {...},
    "linf": {...}, "changed": {...}}`` (norms over the whole image, all channels; relative =
    divided by the norm of the clean output).
    """
    T = int(timesteps)

    def enc(img):  # the same encoder draws for clean and adversarial
        return RateEncoder(generator=torch.Generator().manual_seed(seed))(img, T)

    spikes, spikes_adv = enc(x), enc(x_adv)
    outputs = {
        "input": (x, x_adv),
        "relu": (torch.relu(x), torch.relu(x_adv)),
        "encoded": (spikes.mean(0), spikes_adv.mean(0)),
        "lif": (lif_rate(spikes, leak, threshold, reset), lif_rate(spikes_adv, leak, threshold, reset)),
        "lif_current": (lif_rate(x.expand(T, *x.shape), leak, threshold, reset),
                        lif_rate(x_adv.expand(T, *x_adv.shape), leak, threshold, reset)),
    }
    diff = {k: (a - c) for k, (c, a) in outputs.items()}
    return {"outputs": outputs,
            "l2": {k: float(d.flatten().norm()) for k, d in diff.items()},
            "relative_l2": {k: float(d.flatten().norm() / outputs[k][0].flatten().norm().clamp_min(1e-12))
                            for k, d in diff.items()},
            "linf": {k: float(d.abs().max()) for k, d in diff.items()},
            "changed": {k: int((d != 0).sum()) for k, d in diff.items()}}


def random_sign(x: torch.Tensor, eps: float, seed: int) -> torch.Tensor:
    """x + eps * sign(N(0, 1)), clipped to [0, 1] (no checkpoint: a non-adversarial control)."""
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return (x + eps * torch.sign(noise)).clamp(0.0, 1.0)


def perturbation_analysis(cfg: dict, reporter: Reporter | None = None) -> dict:
    """``snnadv analyze perturbation``: l2 of a perturbation at the input, after ReLU and after LIF."""
    reporter = reporter or Reporter(quiet=cfg.get("quiet", False))
    T = int_list(cfg.get("timesteps"), "timesteps", [100])
    if len(T) != 1:
        raise SnnadvError(f"perturbation takes one --timesteps value, got {T}")
    T = T[0]
    leak = float(cfg.get("leak", 0.99))
    if not 0.0 < leak <= 1.0:
        raise SnnadvError(f"leak must be in (0, 1], got {leak:g}")
    thr = float(cfg.get("threshold") or 1.0)
    if not thr > 0:
        raise SnnadvError(f"--threshold must be positive, got {thr:g}")
    reset = cfg.get("reset") or "zero"
    if reset not in RESETS:
        raise SnnadvError(f"unknown reset '{reset}' (choose subtract or zero)")
    attack_name = str(cfg.get("attack") or CONFIG_STAGES["analyze"]["attack"]).lower()
    if attack_name not in ATTACKS:
        raise SnnadvError(ATTACKS.unknown(attack_name))
    eps, alpha, steps = parse_eps(cfg["eps"]), parse_eps(cfg["alpha"]), int(cfg["steps"])
    check_eps(eps, alpha if takes(attack_name, "alpha") else None, steps)
    index, seed = int(cfg.get("image") or 0), int(cfg.get("seed") or 0)
    if index < 0:
        raise SnnadvError(f"--image must be >= 0, got {index}")

    inputs, model, dataset = {}, None, cfg.get("dataset") or "cifar10"
    if cfg.get("checkpoint"):
        from ..robustness import load_attack_model

        model, info, _ = load_attack_model(cfg["checkpoint"], "ann", "cpu")
        inputs["checkpoint"] = info
        dataset = info["dataset"]
    test = load_split(dataset, cfg["data_dir"], train=False, subset=cfg.get("test_subset"),
                      download=bool(cfg.get("download")))
    if index >= len(test):
        raise SnnadvError(f"--image {index} is out of range: the test split has {len(test)} images")
    x, label = to_float(test.images[index:index + 1]), test.labels[index:index + 1]
    out = run_dir(cfg, NAME)

    pred = None
    if model is not None:
        gen = torch.Generator().manual_seed(seed)
        atk = make_attack(attack_name, model, eps, alpha, steps, bool(cfg.get("random_start")),
                          make_gradient(model), False, gen)
        x_adv = atk(x, label)
        with torch.no_grad():
            pred = {"clean": int(model(x).argmax(1)), "adversarial": int(model(x_adv).argmax(1))}
        source = f"{attack_name.upper()} on the ANN {cfg['checkpoint']}"
    else:
        x_adv = random_sign(x, eps, seed)
        source = "random sign perturbation (no --checkpoint)"
    r = perturbation_norms(x, x_adv, T, leak, thr, reset, seed)
    l2, linf, rel = r["l2"], r["linf"], r["relative_l2"]
    checks = {
        "inputs_non_negative": bool((x >= 0).all() and (x_adv >= 0).all()),
        "relu_l2_equals_input_l2": abs(l2["relu"] - l2["input"]) <= 1e-6 * max(1.0, l2["input"]),
        "lif_l2_le_input_l2": l2["lif"] <= l2["input"],
        "lif_over_input_l2": l2["lif"] / l2["input"] if l2["input"] > 0 else None,
        "lif_current_over_input_l2": l2["lif_current"] / l2["input"] if l2["input"] > 0 else None,
    }
    result = {
        "analysis": NAME,
        "title": "Perturbation through ReLU vs LIF (paper Fig. 4)",
        "settings": {**recorded_settings(cfg, KEYS), "timesteps": T, "leak": leak, "threshold": thr, "reset": reset,
                     "attack": attack_name if model is not None else "random-sign", "eps": eps, "alpha": alpha,
                     "steps": steps, "image": index, "seed": seed, "dataset": dataset},
        "inputs": inputs, "versions": versions(),
        "image": {"index": index, "label": int(label), "class": test.classes[int(label)] if test.classes else None,
                  "prediction": pred, "perturbation": source},
        "l2": l2, "relative_l2": rel, "linf": linf, "changed_values": r["changed"],
        "checks": checks,
        "notes": [f"Adversarial image: {source}, eps={eps:.4f}. LIF: leak {leak:g}, threshold {thr:g}, "
                  f"{reset} reset, T={T}; output = spike count / T. 'LIF (spike input)' is fed the "
                  "rate-encoded image ('rate-encoded input', time-averaged), with the same encoder draws for "
                  "clean and adversarial; 'LIF (current input)' is fed the pixel value as a constant current. "
                  "Norms over the whole image (all channels); relative = divided by the clean output's norm."],
        "tables": [table("Norm of the perturbation after each stage",
                         ["", *[LABELS[s] for s in STAGES]],
                         [["l2", *[l2[s] for s in STAGES]], ["relative l2", *[rel[s] for s in STAGES]],
                          ["L-inf", *[linf[s] for s in STAGES]]])],
    }
    reporter.table(f"Perturbation norm (image {index}, {source})", ["stage", "l2", "relative l2", "L-inf"],
                   [[LABELS[s], l2[s], rel[s], linf[s]] for s in STAGES])

    def draw(figure):
        fig, axes = figure(3, len(STAGES), (3.0 * len(STAGES), 3.2 * 3))
        diffs = {s: (a - c).abs()[0] for s, (c, a) in r["outputs"].items()}
        vmax = max(float(d.max()) for d in diffs.values()) or 1.0
        for j, s in enumerate(STAGES):
            c, a = (t[0] for t in r["outputs"][s])
            top = max(float(c.max()), float(a.max()), 1e-9)
            scale = 1.0 if s in ("input", "relu", "encoded") else 1.0 / top
            for i, (img, name) in enumerate(((c, "clean"), (a, "adversarial"))):
                axes[i][j].imshow((img * scale).clamp(0, 1).permute(1, 2, 0).numpy())
                axes[i][j].set_title(f"{LABELS[s]}: {name}" + ("" if scale == 1.0 else f" (x{scale:.2g})"),
                                     fontsize=8)
            im = axes[2][j].imshow(diffs[s].amax(0).numpy(), cmap="magma", vmin=0.0, vmax=vmax)
            axes[2][j].set_title(f"|difference|, l2 = {l2[s]:.3f}", fontsize=8)
            for i in range(3):
                axes[i][j].axis("off")
        fig.colorbar(im, ax=axes[2][-1], fraction=0.046)
        fig.suptitle("Perturbation l2: " + ", ".join(f"{LABELS[s]} {l2[s]:.3f}" for s in STAGES)
                     + f"  (LIF: leak {leak:g}, threshold {thr:g}, {reset} reset, T={T})", fontsize=9)
        return fig

    rows = [{"stage": s, "l2": l2[s], "relative_l2": rel[s], "linf": linf[s], "changed_values": r["changed"][s]}
            for s in STAGES]
    return write_outputs(out, NAME, result, ["stage", "l2", "relative_l2", "linf", "changed_values"], rows, draw,
                         reporter)
