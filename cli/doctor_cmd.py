"""``snnadv doctor``: a thin wrapper over :func:`snnadv.doctor.doctor`."""

from __future__ import annotations

import click



@click.command("doctor")
@click.option("--device", default="auto", help="auto | cpu | cuda (default auto).")
@click.option("--full", is_flag=True, help="Also run the CUDA checks (pytest) and bench --preset paper (<= 8 min).")
@click.option("--memory", is_flag=True, help="Also print the memory plan of the paper configs.")
@click.option("--no-bench", is_flag=True, help="Skip the short benchmark.")
@click.option("--out", type=click.Path(), help="Write the report as JSON here.")
@click.option("--quiet", is_flag=True, help="Print nothing (the JSON has everything).")
def doctor(device, full, memory, no_bench, out, quiet):
    """Is this install sound and fast? Versions, devices, correctness of the fused scan
    (and the Triton kernels on CUDA), a short bench, one line per problem with its fix."""
    from snnadv.doctor import doctor as run
    from snnadv.report import Reporter

    report = run(device, full=full, memory=memory, out=out, reporter=Reporter(quiet=quiet), bench=not no_bench)
    failed = [c for c in report["checks"].values() if c.get("ok") is False]
    failed += [p for p in report.get("full", {}).values() if not p.get("ok")]
    if failed:
        raise SystemExit(1)
