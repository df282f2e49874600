"""Transfer characteristic of the rate encoder (paper Fig. 3).

Input intensities x (a linspace over [0, 1]) are pre-quantised to b bits and
rate-encoded with :class:`snnadv.encoding.RateEncoder` for T steps (a fixed
generator, so a run is reproducible); the output y is the time average of the spike
train.  y lies on the grid k / T, and E[y] = x_quant (the quantised input), so:

* the *quantised* curve x -> x_quant is a staircase of exactly 2^b levels
  (k / (2^b - 1), k = 0 .. 2^b - 1);
* y scatters around that staircase with T y ~ Binomial(T, x_quant); the averaging
  error mean |y - x_quant| shrinks like 1 / sqrt(T).  Its exact expectation,
  E|Bin(T, q) / T - q| averaged over the x grid, is computed alongside the measured
  value (``err_expected``).

At small T the spike-count grid adds its own discretisation on top of the b-bit
one (the paper's Fig. 3(b), (d): curves for different T differ); at large T the
average converges to x_quant and curves for different T coincide (Fig. 3(c), (e)),
which is why T changes SNN-conv's robustness so little (paper Sec. 4.1).
"""

from __future__ import annotations

import torch

from ..encoding import RateEncoder, quantize
from ..report import Reporter
from .common import bits_label, bits_list, int_list, recorded_settings, run_dir, table, versions, write_outputs

NAME = "encoder"
#: the settings recorded in the result
KEYS = ("bits", "timesteps", "points", "seed")
DEFAULT_BITS = [4, 2]
DEFAULT_STEPS = [50, 150, 300, 2000]
DEFAULT_POINTS = 1001


def expected_abs_error(q: torch.Tensor, T: int) -> torch.Tensor:
    """E|Bin(T, q)/T - q| for each rate q (exact, float64)."""
    q = q.double().clamp(0.0, 1.0)
    k = torch.arange(T + 1, dtype=torch.float64)
    inner = (q > 0) & (q < 1)
    qi = q[inner].unsqueeze(1)
    logc = torch.lgamma(torch.tensor(T + 1.0, dtype=torch.float64)) - torch.lgamma(k + 1) - torch.lgamma(T - k + 1)
    logp = logc + k * torch.log(qi) + (T - k) * torch.log1p(-qi)
    err = torch.zeros_like(q)
    err[inner] = (torch.exp(logp) * (k / T - qi).abs()).sum(1)
    return err


def transfer(x: torch.Tensor, bits: int | None, T: int, seed: int) -> torch.Tensor:
    """The time-averaged encoder output y for inputs x (fixed generator ``seed``)."""
    enc = RateEncoder(bits=bits, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return enc(x, T).mean(0)


def encoder_analysis(cfg: dict, reporter: Reporter | None = None) -> dict:
    """``snnadv analyze encoder``: x vs time-averaged rate-encoder output, per bits and T."""
    reporter = reporter or Reporter(quiet=cfg.get("quiet", False))
    bits = bits_list(cfg.get("bits"), "bits", DEFAULT_BITS)
    steps = int_list(cfg.get("timesteps"), "timesteps", DEFAULT_STEPS)
    points = int_list(cfg.get("points"), "points", [DEFAULT_POINTS])[0]
    seed = int(cfg.get("seed") or 0)
    out = run_dir(cfg, NAME)
    x = torch.linspace(0.0, 1.0, points)

    rows, summary, curves = [], [], {}
    for b in bits:
        q = quantize(x, b)
        levels = int(torch.unique(q).numel())
        for T in steps:
            y = transfer(x, b, T, seed)
            err_q = float((y - q).abs().mean())
            err_x = float((y - x).abs().mean())
            err_exp = float(expected_abs_error(q, T).mean())
            summary.append({"bits": bits_label(b), "timesteps": T, "levels_quantised": levels,
                            "levels_expected": None if b is None else 2 ** b,
                            "levels_output": int(torch.unique(y).numel()),
                            "err_vs_quantised": err_q, "err_expected": err_exp, "err_vs_input": err_x,
                            "quant_err": float((q - x).abs().mean())})
            curves[f"{bits_label(b)}/{T}"] = y.tolist()
            rows += [{"bits": bits_label(b), "timesteps": T, "x": float(xi), "x_quant": float(qi), "y": float(yi)}
                     for xi, qi, yi in zip(x.tolist(), q.tolist(), y.tolist())]

    checks = {}
    for b in bits:
        s = [r for r in summary if r["bits"] == bits_label(b)]
        errs = [r["err_vs_quantised"] for r in sorted(s, key=lambda r: r["timesteps"])]
        key = f"{bits_label(b)}-bit"
        if b is not None:
            checks[f"{key}: quantised levels == 2^b"] = s[0]["levels_quantised"] == 2 ** b
        checks[f"{key}: averaging error shrinks with T"] = all(e2 < e1 for e1, e2 in zip(errs, errs[1:]))
        checks[f"{key}: measured / expected error"] = [
            round(r["err_vs_quantised"] / r["err_expected"], 3) if r["err_expected"] > 0 else None for r in s]

    result = {
        "analysis": NAME,
        "title": "Rate-encoder transfer characteristic: x vs time-averaged output y (paper Fig. 3)",
        "settings": {**recorded_settings(cfg, KEYS), "bits": [bits_label(b) for b in bits], "timesteps": steps,
                     "points": points, "seed": seed},
        "inputs": {}, "versions": versions(),
        "checks": checks,
        "notes": ["y = mean over T of RateEncoder(bits=b)(x) (snnTorch Bernoulli rate coding, fixed generator). "
                  "err_vs_quantised = mean |y - x_quant| over the x grid; err_expected = its exact expectation "
                  "E|Bin(T, q)/T - q|, which falls like 1/sqrt(T)."],
        "summary": summary,
        "x": x.tolist(),
        "curves": curves,
        "tables": [table("Averaging error of the encoder output (mean over the x grid)",
                         ["bits", "T", "levels of x_quant", "mean |y - x_quant|", "expected", "mean |y - x|"],
                         [[r["bits"], r["timesteps"], r["levels_quantised"], r["err_vs_quantised"],
                           r["err_expected"], r["err_vs_input"]] for r in summary])],
    }
    reporter.table("Encoder transfer: averaging error", ["bits", "T", "levels", "|y - x_q|", "expected"],
                   [[r["bits"], r["timesteps"], r["levels_quantised"], r["err_vs_quantised"], r["err_expected"]]
                    for r in summary])

    def draw(figure):
        groups = [steps[i:i + 2] for i in range(0, len(steps), 2)]
        fig, axes = figure(len(bits), len(groups), (4.2 * len(groups), 3.6 * len(bits)))
        styles = ["-", ":", "--", "-."]
        letter = iter("bcdefghijklmnopqrstuvwxyz")
        for i, b in enumerate(bits):
            q = quantize(x, b)
            for j, group in enumerate(groups):
                ax = axes[i][j]
                ax.plot(x, x, color="lightgray", lw=1)
                for k, T in enumerate(group):
                    ax.plot(x, curves[f"{bits_label(b)}/{T}"], styles[k % len(styles)], lw=0.8, alpha=0.8,
                            color=f"C{k}", label=f"y, T={T}")
                ax.plot(x, q, color="black", lw=1.5, zorder=5, label="x_quant (T → ∞)")
                what = "unquantised" if b is None else f"{b}-bit"
                ax.set_title(f"({next(letter)}) {what} input, T={', '.join(map(str, group))}",
                             fontsize=9)
                ax.set_xlabel("input x")
                ax.set_ylabel("time-averaged output y")
                ax.legend(fontsize=7)
        return fig

    return write_outputs(out, NAME, result, ["bits", "timesteps", "x", "x_quant", "y"], rows, draw, reporter)
