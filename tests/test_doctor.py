"""``snnadv doctor``: the CPU path end to end (fast: no bench), its problem lines, and
the --full machinery (CUDA checks via pytest, bench) with a tiny bench."""

from __future__ import annotations

import json

import psutil
import torch

from snnadv import doctor, memory


def test_doctor_cli_on_the_cpu_writes_json(tmp_path, capsys):
    from snnadv.cli.main import main

    out = tmp_path / "doctor.json"
    assert main(["doctor", "--device", "cpu", "--no-bench", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert torch.__version__.startswith(report["versions"]["torch"]) and report["device"] == "cpu"
    check = report["checks"]["fused network vs step-by-step reference"]
    assert check["ok"] and check["scan"]["forward:torch"] > 0 and check["scan"]["backward:torch"] > 0
    assert report["tf32"] == {"tf32_matmul": False, "tf32_cudnn": False}
    plan = report["memory_plan"]  # the CLI keeps freed memory: the plan counts the heap's fragmentation
    assert plan["allocator_factor"] == (memory.CPU_HEAP_FACTOR if report["keep_freed_memory"] else 1.0)
    assert 0 < plan["free_bytes"] < psutil.virtual_memory().total
    printed = capsys.readouterr().out
    assert plan["line"] in printed
    assert "check: fused network vs step-by-step reference: ok" in printed and "saved" in printed
    assert all(set(p) == {"problem", "fix"} for p in report["problems"])


def test_doctor_rejects_a_missing_device(capsys):
    from snnadv.cli.main import main

    if torch.cuda.is_available():
        return
    assert main(["doctor", "--device", "cuda", "--no-bench"]) == 2
    assert capsys.readouterr().err.startswith("error: --device cuda")


def test_problems_name_each_failure_with_a_fix():
    report = {"device": "cuda", "versions": {"triton": None}, "devices": {"cuda": [{}], "cpu_bf16_native": True,
                                                                       "threads": 8, "cpu_count": 8},
              "checks": {"triton kernels vs PyTorch scan": {"ok": False, "error": "boom"}},
              "bench": {"rows": [{"impl": "snnadv", "speedup": 3.0, "scan": {"forward:torch": 4}}]},
              "full": {"cuda_checks": {"ok": False, "returncode": 1}}}
    lines = doctor.problems(report)
    text = "\n".join(f"{p['problem']} -> {p['fix']}" for p in lines)
    assert "pip install triton" in text and "boom" in text and "SNNADV_SCAN=torch" in text
    assert "ran the PyTorch scan on the GPU" in text and "--full: cuda_checks failed" in text


def test_full_runs_the_cuda_checks_and_a_bench_in_subprocesses():
    """The --full machinery on the CPU (CUDA checks skip there; the tiny bench preset)."""
    full = doctor.run_full(torch.device("cpu"), seconds=300, bench_preset="tiny")
    assert full["cuda_checks"]["ok"], full["cuda_checks"]
    assert "skipped" in full["cuda_checks"]["output_tail"]
    assert full["bench"]["ok"] and full["bench"]["result"]["preset"] == "tiny", full["bench"]
