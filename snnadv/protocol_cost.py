"""The cost of an evaluation protocol's components, measured on this machine.

``python -m snnadv.protocol_cost --arch vgg5 --timesteps 32`` times, on an SNN with
random weights (the cost does not depend on the weights, only on the architecture, T
and the batch): one forward pass (what a Square query and an evaluation draw cost),
and one gradient draw through every estimator of the protocol, with the EOT draws
batched into the batch dimension and one draw at a time.  From those units it prints
the protocol's cost per 100 images when every image is attacked by every attack (the
cascade's upper bound: it attacks only the images still correct):

    APGD (per estimator) : steps x EOT x (gradient draw)   [+ one forward per step]
    Square               : queries x (forward)
    evaluation           : draws x (forward) per attack and eps

Prints a Markdown table (for the README); nothing is written.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def unit_costs(snn, paths: list[str], batch: int, eot: int, repeats: int = 1, slope: float = 5.0,
               proxy=None) -> dict:
    """Seconds per image: ``forward``; per path, ``batched`` and ``sequential`` seconds per
    image and draw of an EOT-``eot`` gradient through :class:`snnadv.estimator.EstimatorModule`."""
    from .estimator import EstimatorModule

    x = torch.rand(batch, 3, 32, 32)  # CIFAR-sized
    y = torch.randint(0, 10, (batch,))
    out = {"batch": batch, "eot": eot}
    with torch.no_grad():
        out["forward"] = _timed(lambda: snn(x), repeats) / batch
    out["paths"] = {}
    for p in paths:
        row = {}
        for batched in (True, False):
            opts = {"slope": slope} if p.startswith("bptt-") else {"proxy": proxy} if p == "ann" else {}
            m = EstimatorModule(snn, p, eot=eot, batched=batched, **opts)

            def step():
                xr = x.clone().requires_grad_(True)
                torch.autograd.grad(F.cross_entropy(m(xr), y, reduction="sum"), xr)
            row["batched" if batched else "sequential"] = _timed(step, repeats) / (batch * eot)
        out["paths"][p] = row
    return out


def protocol_table(units: dict, protocol, paths: list[str], images: int = 100) -> list[dict]:
    """Seconds per ``images`` images of each attack and estimator of ``protocol`` (every
    image attacked, every eps), from :func:`unit_costs`."""
    n_eps = len(protocol.eps)
    fwd = units["forward"]
    rows = []
    for a in protocol.attacks:
        if a.startswith("apgd"):
            for p in paths:
                g = units["paths"][p]["batched"]
                s = n_eps * images * protocol.apgd_steps * (protocol.eot * g + fwd)
                rows.append({"attack": f"{a.upper()}-{protocol.apgd_steps}", "estimator": p, "eot": protocol.eot,
                             "seconds": s})
        elif a == "square":
            rows.append({"attack": f"Square-{protocol.square_queries}", "estimator": "none", "eot": 1,
                         "seconds": n_eps * images * protocol.square_queries * fwd})
    rows.append({"attack": "evaluation draws", "estimator": "-", "eot": protocol.eval_draws,
                 "seconds": n_eps * len(rows) * images * protocol.eval_draws * fwd})
    if protocol.sharpness:
        g = units["paths"].get("bptt-fast-sigmoid", {}).get("sequential", 0.0)
        evals = protocol.sharpness_iters + 2
        rows.append({"attack": "sharpness search", "estimator": "bptt-fast-sigmoid", "eot": 1,
                     "seconds": evals * protocol.sharpness_images * (g + fwd), "once": True})
    return rows


def main(argv=None) -> int:
    from .attacks.protocols import PROTOCOLS
    from .attacks.settings import resolve_paths
    from .models import SNN, get_spec

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="tiny")
    ap.add_argument("--timesteps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--eot", type=int, default=10)
    ap.add_argument("--protocol", default="strong")
    ap.add_argument("--paths", default=None, help="estimators (default: the protocol's)")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    snn = SNN(get_spec(a.arch, 10), num_steps=a.timesteps, leak=0.99)
    snn.set_thresholds({n: 0.3 for n in snn.neuron_names})
    snn.eval()
    p = PROTOCOLS[a.protocol]
    paths = resolve_paths(snn, a.paths or p.paths, 5.0)
    if p.sharpness and "bptt-fast-sigmoid" not in paths:
        paths.append("bptt-fast-sigmoid")
    from .models import ANN

    units = unit_costs(snn, paths, a.batch, a.eot, proxy=ANN(get_spec(a.arch, 10)).eval())
    print(f"{a.arch}, T = {a.timesteps}, batch {a.batch}, {torch.get_num_threads()} thread(s), {_cpu_name()}")
    print(f"forward: {units['forward'] * 1e3:.1f} ms per image")
    print("| estimator | gradient draw, batched EOT (ms/img) | one draw at a time (ms/img) |\n|---|---|---|")
    for q, r in units["paths"].items():
        print(f"| {q} | {r['batched'] * 1e3:.1f} | {r['sequential'] * 1e3:.1f} |")
    rows = protocol_table(units, p, paths)
    total = sum(r["seconds"] for r in rows if not r.get("once"))
    print(f"\nprotocol {p.name}, {len(p.eps)} eps, every image attacked (the cascade's upper bound):")
    print("| attack | estimator | EOT | s per 100 images |\n|---|---|---|---|")
    for r in rows:
        per = " (once per model)" if r.get("once") else ""
        print(f"| {r['attack']} | {r['estimator']} | {r['eot']} | {r['seconds']:.0f}{per} |")
    print(f"| total | | | {total:.0f} ({total / 3600:.2f} h per 100 images) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
