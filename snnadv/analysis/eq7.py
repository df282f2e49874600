"""Spike rate versus leak: paper Eq. 7 beside the project's own LIF neuron (Fig. 5, 6a).

The paper feeds a constant input V_mem to an LIF neuron at rest and counts the n
steps its membrane needs to reach the threshold V_th:

    u_k = V_mem (1 + lam + ... + lam^(k-1)) = V_mem (1 - lam^k) / (1 - lam)
    u_n = V_th   =>   1/n = log(lam) / log(r lam - (r - 1)),   r = V_th / V_mem   (Eq. 7)

(:func:`snnadv.neurons.eq7_spike_rate`).  Here that closed form is set beside the
rate measured by simulating :class:`snnadv.neurons.LIF` (its fused multi-step path,
the one the networks use) for ``sim_steps`` steps with a constant input current
V_mem = ratio x V_th, V_th = ``threshold``.

What "agree" means.  Eq. 7's n is a real number; a simulated neuron fires on whole
steps.  With a **hard reset** (reset to zero, the reset Eq. 7 assumes) the membrane
after a spike starts again from rest, so the neuron fires periodically with interval

    k* = the first whole k with u_k > V_th = floor(n) + 1

(``ceil(n)`` for non-integer n; the project's neuron fires when u *exceeds* the
threshold, so an exactly integer n, a tie u_n = V_th, waits one more step).  Hence:

* exactly: the simulated interval equals k*, and the spike count over N steps equals
  floor(N / k*) (ties, |n - round(n)| < 1e-4, are excluded from the exact check:
  float32 rounding decides them);
* within the discretisation: n <= k* < n + 1, i.e. the measured rate 1/k* lies in
  (1/(n + 1), 1/n]; it is Eq. 7's rate rounded down to the step grid.

With a **soft reset** (subtract the threshold, the project's default for networks)
the residual charge is carried over (leaked first, then the unleaked threshold is
subtracted, as in snnTorch, so it can go slightly negative): the rate differs from
Eq. 7's; it is plotted (dotted) for comparison, not checked.  A neuron with r (1 - lam) >= 1 never
fires (Eq. 7 gives 0; the simulation counts no spike).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import SnnadvError
from ..neurons import LIF, eq7_spike_rate
from ..report import Reporter
from .common import float_list, int_list, recorded_settings, run_dir, table, versions, write_outputs

NAME = "eq7"
#: the settings recorded in the result
KEYS = ("ratios", "lam_min", "lam_max", "points", "sim_steps", "threshold")
DEFAULT_RATIOS = [0.1, 0.2, 0.5, 0.8]
DEFAULT_POINTS = 50
TIE = 1e-4


def eq7_n(leak: float, ratio: float) -> float:
    """Eq. 7's n (steps to reach the threshold from rest); ``inf`` if never."""
    rate = eq7_spike_rate(leak, ratio)
    return math.inf if rate <= 0.0 else 1.0 / rate


def expected_interval(leak: float, ratio: float) -> tuple[int | None, bool]:
    """(k*, tie): the hard-reset firing interval floor(n) + 1, and whether n is a tie."""
    n = eq7_n(leak, ratio)
    if not math.isfinite(n):
        return None, False
    if ratio >= 1.0:  # fires on the first step unless exactly at the threshold
        return (2 if ratio == 1.0 else 1), ratio == 1.0
    return int(math.floor(n)) + 1, abs(n - round(n)) < TIE


@torch.no_grad()
def simulate(leak: float, ratios: list[float], steps: int, threshold: float = 1.0,
             reset: str = "zero") -> dict:
    """Simulate one :class:`LIF` per ratio (constant input ratio x threshold) for ``steps`` steps.

    Returns per ratio: ``count`` (spikes), ``rate`` (count / steps), ``first`` (step
    of the first spike, 1-based; 0 if none) and ``interval`` (mean steps between
    spikes; the first spike time if it fired once; None if never).
    """
    neuron = LIF(leak=leak, threshold=threshold, reset=reset)
    neuron.reset_state()
    current = (torch.tensor(ratios, dtype=torch.float32) * threshold).expand(steps, len(ratios)).contiguous()
    spk = neuron.multistep(current).bool()  # [steps, R]
    count = spk.sum(0)
    t = torch.arange(1, steps + 1).unsqueeze(1).expand_as(spk)
    first = torch.where(spk, t, steps + 1).amin(0)
    last = torch.where(spk, t, 0).amax(0)
    out = []
    for i in range(len(ratios)):
        c = int(count[i])
        f = int(first[i]) if c else 0
        interval = None if c == 0 else (float(f) if c == 1 else (int(last[i]) - f) / (c - 1))
        out.append({"count": c, "rate": c / steps, "first": f, "interval": interval})
    return out


@torch.no_grad()
def membrane_trace(leak: float, ratio: float, steps: int, threshold: float = 1.0) -> list[float]:
    """Membrane of a hard-reset LIF fed ratio x threshold, step by step (paper Fig. 5)."""
    neuron = LIF(leak=leak, threshold=threshold, reset="zero")
    neuron.reset_state()
    x = torch.full((1,), ratio * threshold)
    trace = []
    for _ in range(steps):
        _, mem = neuron(x)
        trace.append(float(mem[0]))
    return trace


def lambdas(lam_min: float, lam_max: float, points: int) -> list[float]:
    return [float(v) for v in np.linspace(lam_max, lam_min, points)]


def eq7_analysis(cfg: dict, reporter: Reporter | None = None) -> dict:
    """``snnadv analyze eq7``: Eq. 7 vs the simulated LIF, several V_mem / V_th ratios."""
    reporter = reporter or Reporter(quiet=cfg.get("quiet", False))
    ratios = float_list(cfg.get("ratios"), "ratios", DEFAULT_RATIOS)
    if any(r <= 0 for r in ratios):
        raise SnnadvError(f"--ratios are V_mem / V_th and must be positive, got {ratios}")
    lam_min, lam_max = float(cfg["lam_min"]), float(cfg["lam_max"])
    if not 0.0 < lam_min < lam_max < 1.0:
        raise SnnadvError(f"need 0 < lam-min < lam-max < 1 (Eq. 7 holds for lam < 1), got "
                          f"{lam_min:g} and {lam_max:g}")
    points = int_list(cfg.get("points"), "points", [DEFAULT_POINTS])[0]
    steps = int_list(cfg.get("sim_steps"), "sim-steps", [2000])[0]
    thr = float(cfg.get("threshold") or 1.0)
    if not thr > 0:
        raise SnnadvError(f"--threshold must be positive, got {thr}")
    out = run_dir(cfg, NAME)
    lams = lambdas(lam_min, lam_max, points)

    rows = []
    with reporter.progress("simulating LIF neurons", len(lams)) as advance:
        for lam in lams:
            hard = simulate(lam, ratios, steps, thr, "zero")
            soft = simulate(lam, ratios, steps, thr, "subtract")
            for i, ratio in enumerate(ratios):
                n = eq7_n(lam, ratio)
                k, tie = expected_interval(lam, ratio)
                h = hard[i]
                rows.append({
                    "ratio": ratio, "leak": lam, "n_eq7": n if math.isfinite(n) else None,
                    "rate_eq7": eq7_spike_rate(lam, ratio), "interval_expected": k, "tie": tie,
                    "interval_sim": h["interval"], "first_spike_sim": h["first"] or None,
                    "rate_sim": h["rate"], "rate_sim_interval": None if h["interval"] is None else 1.0 / h["interval"],
                    "count_sim": h["count"],
                    "count_expected": 0 if k is None else steps // k, "rate_sim_soft": soft[i]["rate"],
                })
            advance(1)
    checks = _checks(rows, steps)
    # Fig. 5: membrane traces at a few leaks, for the smallest ratio that fires at all of them
    trace_leaks = [lam_max] + [lam for lam in (0.95, 0.9, 0.85) if lam_min <= lam < lam_max]
    firing = [r for r in sorted(ratios) if all(eq7_spike_rate(lam, r) > 0 for lam in trace_leaks)]
    trace_ratio = firing[0] if firing else max(ratios)
    traces = {f"{lam:g}": membrane_trace(lam, trace_ratio, 50, thr) for lam in trace_leaks}

    result = {
        "analysis": NAME,
        "title": "Spike rate vs leak: Eq. 7 and the simulated LIF neuron (paper Fig. 5, 6a)",
        "settings": {**recorded_settings(cfg, KEYS), "ratios": ratios, "points": points, "sim_steps": steps,
                     "threshold": thr, "lambdas": lams},
        "inputs": {}, "versions": versions(),
        "checks": checks,
        "notes": [
            "Simulated: snnadv.neurons.LIF (fused multi-step path), constant input ratio x threshold, "
            f"{steps} steps, from rest. Hard reset (to zero) is the reset Eq. 7 assumes: the interval is "
            "k* = floor(n) + 1 (= ceil(n) for non-integer n), so the simulated rate 1/k* is Eq. 7's rate "
            "rounded down to whole steps. The soft reset (subtract) keeps the residual charge and fires faster.",
        ],
        "rows": rows,
        "traces": {"ratio": trace_ratio, "threshold": thr, "membrane": traces},
        "tables": [table(
            "Spike rate (per step) at selected leaks: Eq. 7 / simulated hard reset (1/interval) / soft reset",
            ["V_mem/V_th"] + [f"lam={lam:.4g}" for lam in _picked(lams)],
            [[f"{r:g}"] + [_cell(rows, r, lam) for lam in _picked(lams)] for r in ratios])],
    }
    reporter.table("Eq. 7 vs simulation (hard reset)", ["check", "value"],
                   [[k, v] for k, v in checks.items() if not isinstance(v, list)])

    def draw(figure):
        fig, axes = figure(1, 2, (10, 4))
        ax, ax2 = axes[0]
        colors = [f"C{i}" for i in range(len(ratios))]
        for r, c in zip(ratios, colors):
            pts = [row for row in rows if row["ratio"] == r]
            x = [p["leak"] for p in pts]
            ax.plot(x, [p["rate_eq7"] for p in pts], "-", color=c, label=f"Eq. 7, V_mem/V_th={r:g}")
            ax.plot(x, [p["rate_sim_interval"] or 0.0 for p in pts], "o", ms=3, color=c,
                    label="LIF sim (hard reset)" if r == ratios[0] else None)
            ax.plot(x, [p["rate_sim_soft"] for p in pts], ":", color=c,
                    label="LIF sim (soft reset)" if r == ratios[0] else None)
        ax.set_xlabel("leak factor λ")
        ax.set_ylabel("spike rate (spikes / step)")
        ax.set_title("(a) spike rate vs leak (Eq. 7)")
        ax.legend(fontsize=7)
        for (lam, tr), c in zip(traces.items(), colors):
            ax2.plot(range(1, len(tr) + 1), tr, "-o", ms=2, color=c, label=f"λ={lam}")
        ax2.axhline(thr, color="gray", ls="--", lw=1, label="V_th")
        ax2.set_xlabel("timestep")
        ax2.set_ylabel("membrane potential")
        ax2.set_title(f"(b) LIF membrane, V_mem/V_th={trace_ratio:g} (Fig. 5)")
        ax2.legend(fontsize=7)
        return fig

    columns = ["ratio", "leak", "n_eq7", "rate_eq7", "interval_expected", "tie", "interval_sim", "rate_sim_interval",
               "rate_sim", "count_sim", "count_expected", "rate_sim_soft"]
    return write_outputs(out, NAME, result, columns, rows, draw, reporter)


def _checks(rows: list[dict], steps: int) -> dict:
    """Agreement of the hard-reset simulation with Eq. 7 (see the module docstring)."""
    compared = [r for r in rows if r["interval_expected"] is not None and r["interval_expected"] <= steps
                and not r["tie"]]
    interval_bad = [r for r in compared if r["interval_sim"] != r["interval_expected"]]
    count_bad = [r for r in rows if not r["tie"] and r["count_sim"] != r["count_expected"]]
    within = [r for r in compared if r["n_eq7"] is not None and r["interval_sim"] is not None]
    gaps = [r["interval_sim"] - r["n_eq7"] for r in within]
    rate_err = [abs(r["rate_eq7"] - r["rate_sim_interval"]) for r in within]
    silent = [r for r in rows if r["rate_eq7"] == 0.0]
    return {
        "compared": len(compared),
        "ties_excluded": sum(1 for r in rows if r["tie"]),
        "interval_equals_floor_n_plus_1": len(interval_bad) == 0,
        "interval_mismatches": [(r["ratio"], r["leak"], r["interval_sim"], r["interval_expected"])
                                for r in interval_bad][:20],
        "count_equals_floor_N_over_k": len(count_bad) == 0,
        "min_interval_minus_n": min(gaps) if gaps else None,
        "max_interval_minus_n": max(gaps) if gaps else None,
        "within_discretisation": all(-1e-9 <= g < 1.0 + 1e-9 for g in gaps),
        "max_abs_rate_error": max(rate_err) if rate_err else None,
        "never_fire_eq7": len(silent),
        "never_fire_agree": all(r["count_sim"] == 0 for r in silent),
    }


def _picked(lams: list[float]) -> list[float]:
    """A few leaks for the summary table (both ends and three between)."""
    idx = sorted({round(i * (len(lams) - 1) / 4) for i in range(5)})
    return [lams[i] for i in idx]


def _cell(rows, ratio, lam) -> str:
    r = next(x for x in rows if x["ratio"] == ratio and x["leak"] == lam)
    sim = r["rate_sim_interval"]
    return f"{r['rate_eq7']:.4f} / {0.0 if sim is None else sim:.4f} / {r['rate_sim_soft']:.4f}"
