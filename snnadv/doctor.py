"""``snnadv doctor``: is this install sound, and fast?

One command, in about 20-40 s: versions, devices, a correctness check of the fused
multi-step network against the step-by-step reference on the chosen device (and, on
CUDA, of the Triton kernels against the PyTorch scan, asserting from
:data:`snnadv.kernels.scan.RUNS` that the kernels ran), a short benchmark, and one
line per problem found with its fix.  ``--full`` adds the CUDA checks
(:mod:`snnadv.cuda_checks`, run with pytest from the installed package) and
``snnadv bench --preset paper`` (one timed iteration per workload), within
:data:`FULL_SECONDS` in all.  ``--memory`` adds the memory plan of the paper configs
(:mod:`snnadv.memory`).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import resolve_device
from .errors import SnnadvError
from .kernels import scan
from .memory import GiB
from .outputs import write_json
from .report import Reporter

#: the whole ``--full`` run (CUDA checks + paper bench) must end within this
FULL_SECONDS = 8 * 60
PACKAGES = ("torch", "snntorch", "triton", "numpy", "torchvision", "click", "rich", "pytest", "torchattacks")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("snnadv", *PACKAGES):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["cuda"] = torch.version.cuda
    out["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return out


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((l for l in f if l.startswith("flags")), "")
        return set(line.split(":", 1)[-1].split())
    except OSError:
        return set()


def devices() -> dict:
    from .bench import _device_info

    cpu = _device_info(torch.device("cpu"))
    flags = _cpu_flags()
    out = {"cpu": cpu["device_name"], "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
           "cpu_bf16_native": bool(flags & {"avx512_bf16", "amx_bf16"}), "cuda": []}
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        p = torch.cuda.get_device_properties(i)
        out["cuda"].append({"index": i, "name": p.name, "memory_gib": p.total_memory / 2 ** 30,
                            "capability": f"{p.major}.{p.minor}", "bf16": torch.cuda.is_bf16_supported()})
    return out


def check_network(device: torch.device, precision: str = "fp32") -> dict:
    """The fused network (one scan per layer, chunks) against the step-by-step reference
    (snnTorch's single-step neurons): same logits, same BPTT input gradient, on a tiny
    SNN with binary images (the encoder's spikes are then the same in both)."""
    from .models import SNN, get_spec

    g = torch.Generator().manual_seed(0)
    x = (torch.rand(4, 3, 32, 32, generator=g) > 0.5).float().to(device)
    y = torch.randint(0, 10, (4,), generator=g).to(device)
    out, before = {}, scan.RUNS.copy()
    for mode in ("reference", "fused"):
        torch.manual_seed(0)
        snn = SNN(get_spec("tiny", 10), num_steps=12, leak=0.95, mode=mode, chunk_steps=5,
                  precision=precision).to(device).eval()
        snn.set_thresholds({n: 0.3 for n in snn.neuron_names})
        xg = x.clone().requires_grad_(True)
        logits = snn(xg)
        F.cross_entropy(logits, y, reduction="sum").backward()
        out[mode] = (logits.detach().float(), xg.grad)
    logit_diff = (out["fused"][0] - out["reference"][0]).abs().max().item()
    grad_diff = (out["fused"][1] - out["reference"][1]).abs().max().item()
    scale = out["reference"][1].abs().max().item() or 1.0
    tol = 1e-4 if precision == "fp32" else 5e-2
    return {"precision": precision, "max_logit_diff": logit_diff, "max_grad_diff_rel": grad_diff / scale,
            "ok": logit_diff <= tol and grad_diff <= tol * scale, "scan": scan.runs_since(before)}


def check_triton(device: torch.device) -> dict:
    """On CUDA: the Triton kernels (forced, so a failure is an error) against the PyTorch
    scan at an awkward size, fp32 and bf16; ``ran`` says what actually executed."""
    from .errors import SnnadvError
    from .kernels import lif_scan
    from .surrogates import make_surrogate

    if device.type != "cuda":
        return {"skipped": "no CUDA device"}
    results, before = {}, scan.RUNS.copy()
    try:
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator(device=device).manual_seed(0)
            cur = (0.6 * torch.randn(33, 10007, generator=g, device=device) + 0.35).to(dtype)
            mem0, dt0 = torch.zeros(10007, device=device), torch.full((10007,), 1000.0, device=device)
            res = {}
            for backend in ("torch", "triton"):
                c = cur.clone().requires_grad_(True)
                spk, mem, _ = lif_scan(c, mem0, dt0, 0.99, 1.0, False, make_surrogate("stdb"), backend=backend)
                spk.float().sum().backward()
                res[backend] = (spk.detach(), mem, c.grad.float())
            results[str(dtype).replace("torch.", "")] = {
                "spikes_equal": torch.equal(res["torch"][0], res["triton"][0]),
                "max_grad_diff": (res["torch"][2] - res["triton"][2]).abs().max().item()}
    except SnnadvError as e:
        return {"ok": False, "error": str(e), "ran": scan.runs_since(before)}
    ran = scan.runs_since(before)
    ok = all(r["spikes_equal"] and r["max_grad_diff"] < 1e-2 for r in results.values()) and \
        ran.get("forward:triton", 0) >= 2 and ran.get("backward:triton", 0) >= 2
    return {"ok": ok, **results, "ran": ran}


def quick_bench(device: torch.device) -> dict:
    """~20 s: SNN-BP training steps of VGG5 against the plain snnTorch loop."""
    from .bench import run_bench

    cfg = {"device": device.type, "only": "snn_train", "iters": 2, "warmup": 1}
    cfg.update({"preset": "cpu", "timesteps": 16} if device.type == "cpu" else {"preset": "paper", "timesteps": 32})
    t0 = time.perf_counter()
    r = run_bench(cfg)
    rows = [{k: row[k] for k in ("impl", "precision", "batch", "timesteps", "images_per_s", "scan")} |
            {"speedup": row.get("speedup")} for row in r["rows"]]
    return {"seconds": time.perf_counter() - t0, "arch": r["arch"], "rows": rows}


def run_full(device: torch.device, seconds: float = FULL_SECONDS, bench_preset: str = "paper") -> dict:
    """The CUDA checks (pytest on :mod:`snnadv.cuda_checks`) and ``bench --preset
    paper`` (one warm-up, one timed iteration per workload), each in a subprocess with
    what is left of ``seconds``."""
    from . import cuda_checks

    deadline, out = time.monotonic() + seconds, {}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out["cuda_checks"] = _subprocess([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                                      cuda_checks.__file__], deadline, env)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "bench.toml"
        cfg.write_text("[bench]\nwarmup = 1\n")
        result = Path(tmp) / "bench.json"
        out["bench"] = _subprocess([sys.executable, "-c", "from snnadv.cli.main import main; raise SystemExit(main())",
                                    "bench", "--preset", bench_preset, "--iters", "1", "--device", device.type,
                                    "--config", str(cfg), "--out", str(result), "--quiet"], deadline, env)
        if result.exists():
            import json

            out["bench"]["result"] = json.loads(result.read_text())
    return out


def _subprocess(cmd: list[str], deadline: float, env: dict) -> dict:
    left = deadline - time.monotonic()
    if left < 5:
        return {"ok": False, "error": "no time left"}
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=left, env=env)
        return {"ok": p.returncode == 0, "returncode": p.returncode, "seconds": time.perf_counter() - t0,
                "output_tail": (p.stdout + p.stderr)[-4000:]}
    except subprocess.TimeoutExpired as e:
        tail = (e.stdout or b"")[-4000:]
        return {"ok": False, "error": f"timed out after {left:.0f} s", "seconds": time.perf_counter() - t0,
                "output_tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail}


def problems(report: dict) -> list[dict]:
    """One {problem, fix} per thing that is wrong or slow."""
    out = []

    def add(problem, fix):
        out.append({"problem": problem, "fix": fix})

    v, d, device = report["versions"], report["devices"], report["device"]
    if device.startswith("cuda") and not v.get("triton"):
        add("Triton is not installed: neurons run the PyTorch scan on the GPU (much slower)",
            "pip install triton (the version your torch was built with)")
    if device == "cpu" and d["cuda"]:
        add("a CUDA GPU is present but the check ran on the CPU", "snnadv doctor --device cuda")
    for name, check in report["checks"].items():
        if check.get("ok") is False:
            add(f"{name} failed: {check.get('error') or check}",
                "SNNADV_SCAN=torch runs the PyTorch scan; reinstall torch/triton for this GPU and report the JSON"
                if "triton" in name else "reinstall snnadv and torch; report the JSON (--out) if it persists")
    if device == "cpu" and not d["cpu_bf16_native"]:
        add("this CPU has no native bf16 (avx512_bf16/AMX): --precision bf16 is correct but slow here",
            "use --precision fp32 on this machine")
    if d["threads"] < (d["cpu_count"] or 1) // 2:
        add(f"torch uses {d['threads']} threads of {d['cpu_count']} CPUs", "unset OMP_NUM_THREADS or raise it")
    for row in report.get("bench", {}).get("rows", []):
        if row["impl"] == "snnadv" and row.get("speedup") is not None and row["speedup"] < 1.0:
            add(f"snnadv trains slower than the plain snnTorch loop here ({row['speedup']:.2f}x)",
                "check the machine's load; report `snnadv bench` output")
        if row["impl"] == "snnadv" and device.startswith("cuda") and "forward:triton" not in row.get("scan", {}):
            add(f"the benchmark ran the PyTorch scan on the GPU ({row.get('scan')})",
                "pip install triton; check the Triton check above")
    for name, part in report.get("full", {}).items():
        if not part.get("ok"):
            add(f"--full: {name} failed ({part.get('error') or 'exit ' + str(part.get('returncode'))})",
                "read output_tail in the JSON (--out)")
    return out


def doctor(device: str = "auto", full: bool = False, memory: bool = False, out: str | None = None,
           reporter: Reporter | None = None, bench: bool = True) -> dict:
    """Run the checks, print them, write JSON to ``out``; returns the report."""
    from .runtime import keep_freed_memory, tf32_policy

    reporter = reporter or Reporter()
    dev = resolve_device(device)
    t0 = time.perf_counter()
    report = {"device": str(dev), "versions": versions(), "devices": devices(), "tf32": tf32_policy(),
              "keep_freed_memory": keep_freed_memory(), "scan_backend": os.environ.get("SNNADV_SCAN", "auto")}
    reporter.print("versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v))
    cuda = ", ".join(f"{c['name']} ({c['memory_gib']:.0f} GiB)" for c in report["devices"]["cuda"]) or "none"
    reporter.print(f"devices: {report['devices']['cpu']} ({report['devices']['threads']} threads); CUDA: {cuda}")
    report["memory_plan"] = memory_budget(dev)
    reporter.print(report["memory_plan"]["line"])
    report["checks"] = {"fused network vs step-by-step reference": check_network(dev)}
    if dev.type == "cuda":  # (bf16 is checked here, kernel against kernel: the reference is fp32-only)
        report["checks"]["triton kernels vs PyTorch scan"] = check_triton(dev)
    for name, c in report["checks"].items():
        reporter.print(f"check: {name}: {'ok' if c.get('ok') else 'FAILED'} "
                       f"({', '.join(f'{k}={v}' for k, v in c.items() if k != 'ok')})")
    if bench:
        report["bench"] = quick_bench(dev)
        for r in report["bench"]["rows"]:
            sp = f", {r['speedup']:.2f}x the snnTorch loop" if r["speedup"] else ""
            reporter.print(f"bench: SNN-BP training {report['bench']['arch']} {r['impl']} {r['precision']} batch "
                           f"{r['batch']} T={r['timesteps']}: {r['images_per_s']:.3g} img/s{sp} (scan: {r['scan']})")
    if memory:

        budget = int(0.9 * torch.cuda.get_device_properties(dev).total_memory) if dev.type == "cuda" else 80 * GiB
        report["memory"] = paper_plan(budget)
        reporter.print(format_plan(report["memory"], budget))
    if full:
        report["full"] = run_full(dev)
        for name, part in report["full"].items():
            reporter.print(f"full: {name}: {'ok' if part.get('ok') else 'FAILED'} ({part.get('seconds', 0):.0f} s)")
    report["problems"] = problems(report)
    report["seconds"] = time.perf_counter() - t0
    for p in report["problems"]:
        reporter.print(f"[yellow]problem:[/] {p['problem']} -> {p['fix']}")
    if not report["problems"]:
        reporter.print("[green]no problems found[/]")
    if out:
        write_json(out, report)
        reporter.print(f"[green]saved[/] {out}")
    return report


# --------------------------------------------------------------------------- the memory plan
def memory_budget(dev: torch.device) -> dict:
    """What an attack on ``dev`` may plan with now (:func:`snnadv.memory.free_bytes`), the
    factor its estimates are multiplied by, the limit if one is set, and a line saying so."""
    from . import memory as mem

    free, factor, limit = mem.free_bytes(dev), mem.allocator_factor(dev.type), mem.limit_bytes()
    if free is None:
        line = f"memory plan: none on {dev.type} (free memory unknown here): attack batches are not split"
    else:
        line = (f"memory plan: {free / GiB:.1f} GiB free for attacks on {dev.type}"
                + (f", estimates x {factor:g} for the heap's fragmentation" if factor != 1 else "")
                + (f", capped by SNNADV_MEMORY_LIMIT={limit / GiB:g}" if limit is not None else ""))
    return {"free_bytes": free, "allocator_factor": factor, "limit_bytes": limit, "line": line}


#: the stages of a paper config, as (stage, kind, the config's stage for batch and T,
#: which T): conversion and the table's SNN-conv run at the conversion T, fine-tuning
#: and the SNN-BP attacks at the fine-tuning T
PAPER_STAGES = [
    ("train-ann", "ann-train", "train-ann", None),
    ("convert (balance, curve)", "infer", "convert", "convert"),
    ("finetune (BPTT)", "snn-train", "finetune", "finetune"),
    ("table: SNN-conv clean", "infer", "table", "convert"),
    ("table: attack SNN-conv, alg1", "alg1", "table", "convert"),
    ("table: attack SNN-conv, bptt", "bptt", "table", "convert"),
    ("table: attack SNN-BP, alg1", "alg1", "table", "finetune"),
    ("table: attack SNN-BP, bptt", "bptt", "table", "finetune"),
]

PAPER_CONFIGS = ("vgg5_cifar10", "resnet20_cifar10", "vgg11_cifar100")


def paper_plan(budget: int = 80 * GiB, precision: str = "fp32", configs=PAPER_CONFIGS,
               config_dir: Path | None = None) -> list[dict]:
    """One row per paper config and stage: T, asked batch, chosen batch x pieces, chunk,
    estimated peak (or why nothing fits)."""
    from .config import FINETUNE_STEPS, resolve
    from .data import DATASETS
    from .memory import _profile, plan
    from .models import get_spec

    config_dir = config_dir or Path(__file__).resolve().parents[1] / "configs"
    rows = []
    for name in configs:
        path = config_dir / f"{name}.toml"
        ann = resolve("train-ann", path)
        spec = get_spec(ann["arch"], DATASETS[ann["dataset"]])
        steps = {"convert": resolve("convert", path)["timesteps"],
                 "finetune": resolve("finetune", path)["timesteps"] or FINETUNE_STEPS[ann["arch"]]}
        for label, kind, stage, which in PAPER_STAGES:
            cfg = resolve(stage, path)
            T = steps[which] if which else 1
            batch = cfg["batch_size"]
            row = {"config": name, "arch": spec.arch, "stage": label, "kind": kind, "timesteps": T,
                   "batch_asked": batch, "precision": precision}
            try:
                row.update(plan(_profile(spec, kind, precision if kind != "ann-train" else "fp32"), batch, T, budget))
            except SnnadvError as e:
                row["error"] = str(e)
            rows.append(row)
    return rows


def format_plan(rows: list[dict], budget: int) -> str:
    """The plan as a Markdown table."""
    out = [f"Estimated peak memory per stage on a {budget / GiB:.0f} GiB budget "
           f"({rows[0]['precision'] if rows else 'fp32'}; snnadv.memory)", "",
           "| config | stage | T | batch | chosen batch x pieces | chunk | peak GiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['config']} | {r['stage']} | {r['timesteps']} | {r['batch_asked']} | does not fit | "
                       f"- | {r['error']} |")
        else:
            out.append(f"| {r['config']} | {r['stage']} | {r['timesteps']} | {r['batch_asked']} | "
                       f"{r['batch']} x {r['pieces']} | {r['chunk']} | {r['peak_bytes'] / GiB:.1f} |")
    return "\n".join(out)
