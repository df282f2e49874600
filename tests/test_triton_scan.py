"""The Triton LIF scan (snnadv.kernels.triton_scan) against the PyTorch one (scan._LIFScan).

Same spikes (bit for bit), final state and gradients for every surrogate (stdb, linear,
fast-sigmoid) x reset (soft, hard; and none) x leak (IF, LIF), with carried state (nonzero mem0,
finite dt0).  On the CPU the kernels run under the Triton interpreter, which must be
switched on (TRITON_INTERPRET=1) before any kernel is defined, so that comparison runs
in a subprocess; on a CUDA GPU the compiled kernels are compared at a larger size.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# The comparison itself; run in this process on CUDA, in a subprocess (interpreter) on CPU.
# It prints one JSON line per case: {"case": ..., "errors": [...], "rate": spike rate}.
COMPARE = textwrap.dedent('''
    import itertools, json, sys
    import torch
    from snnadv.kernels import scan
    from snnadv.kernels import lif_scan
    from snnadv.kernels.scan import _LIFScan
    from snnadv.kernels.triton_scan import TritonLIFScan
    from snnadv.surrogates import FastSigmoid, LinearSurrogate, SpikeTime

    SURROGATES = {"stdb": SpikeTime(alpha=0.3, beta=0.05), "linear": LinearSurrogate(0.3),
                  "fast-sigmoid": FastSigmoid(5.0)}
    THR = 1.0


    def inputs(T, N, dtype, device, seed):
        g = torch.Generator().manual_seed(seed)
        cur = (0.6 * torch.randn(T, N, generator=g) + 0.35).to(device=device, dtype=dtype)
        mem0 = (0.7 * torch.randn(N, generator=g)).to(device)        # some start above thr
        dt0 = torch.randint(1, 30, (N,), generator=g).float()
        dt0[::7] = 1000.0                                             # never fired yet
        grad_spk = torch.randn(T, N, generator=g).to(device=device, dtype=dtype)
        grad_mem = torch.randn(N, generator=g).to(device)
        return cur, mem0, dt0.to(device), grad_spk, grad_mem


    def run(fn, cur, mem0, dt0, grad_spk, grad_mem, leak, hard, surrogate):
        cur = cur.clone().requires_grad_(True)
        mem0 = mem0.clone().requires_grad_(True)
        spk, mem, dt = fn(cur, mem0, dt0, leak, THR, hard, surrogate)
        ((spk.float() * grad_spk.float()).sum() + (mem * grad_mem).sum()).backward()
        return spk.detach(), mem.detach(), dt, cur.grad, mem0.grad


    def kernel_ran(before, errors, directions=("forward", "backward")):
        """The comparison means nothing if the kernel fell back to the PyTorch scan."""
        ran = scan.runs_since(before)
        if not all(ran.get(f"{d}:triton") for d in directions) or any("failed" in k for k in ran):
            errors.append(f"the Triton kernel did not run (ran: {ran})")


    def compare(case, T, N, dtype, device, leak, hard, sname, seed):
        args = inputs(T, N, dtype, device, seed)
        ref = run(_LIFScan.apply, *args, leak, hard, SURROGATES[sname])
        before = scan.RUNS.copy()
        tri = run(TritonLIFScan.apply, *args, leak, hard, SURROGATES[sname])
        errors = []
        kernel_ran(before, errors)
        if tri[0].dtype != ref[0].dtype or not torch.equal(tri[0], ref[0]):
            errors.append(f"spikes differ in {(tri[0] != ref[0]).sum().item()} places")
        checks = [("mem", 1e-6, 1e-6), ("dt", 0.0, 0.0), ("grad current", 1e-5, 1e-6), ("grad mem0", 1e-5, 1e-6)]
        if dtype == torch.bfloat16:  # the gradient comes back in bf16: one bf16 rounding apart at most
            checks[2] = ("grad current", 1e-2, 1e-6)
        for (name, rtol, atol), a, b in zip(checks, tri[1:], ref[1:]):
            try:
                torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
            except AssertionError as e:
                errors.append(f"{name}: {e}")
        print(json.dumps({"case": case, "errors": errors, "rate": ref[0].float().mean().item()}), flush=True)


    def main(T, N, device):
        seed = 0
        for sname, hard, leak in itertools.product(SURROGATES, (False, True), (1.0, 0.9)):
            seed += 1
            case = f"{sname} {'hard' if hard else 'soft'} leak={leak} fp32"
            compare(case, T, N, torch.float32, device, leak, hard, sname, seed)
        for sname in SURROGATES:  # bf16 currents (the spikes and gradients come back in bf16)
            compare(f"{sname} soft leak=0.9 bf16", T, N, torch.bfloat16, device, 0.9, False, sname, 100)
        for sname in SURROGATES:  # no reset (snnTorch's "none"); a strong leak keeps the rate moderate
            compare(f"{sname} none leak=0.5 fp32", T, N, torch.float32, device, 0.5, "none", sname, 400)
        compare("stdb hard leak=0.9 T=1", 1, N, torch.float32, device, 0.9, True, "stdb", 200)

        # through lif_scan: a channels-last [T, B, C, H, W] tensor, backend forced
        g = torch.Generator().manual_seed(300)
        x = (0.6 * torch.randn(T, 2, 3, 5, 4, generator=g) + 0.35).to(device)
        x = x.contiguous(memory_format=torch.channels_last_3d)
        mem0 = 0.5 * torch.randn(2, 3, 5, 4, generator=g).to(device)
        dt0 = torch.full((2, 3, 5, 4), 1000.0, device=device)
        before = scan.RUNS.copy()
        out = {b: lif_scan(x, mem0, dt0, 0.9, THR, False, SpikeTime(), backend=b) for b in ("torch", "triton")}
        errors = [f"lif_scan output {i} differs" for i in range(3)
                  if not torch.equal(out["torch"][i], out["triton"][i])]
        kernel_ran(before, errors, ("forward",))
        print(json.dumps({"case": "lif_scan channels-last", "errors": errors,
                          "rate": out["torch"][0].mean().item()}), flush=True)

        # a whole SNN training step (tiny model, T=4): every neuron through the chosen
        # backend (SNNADV_SCAN); same logits and weight gradients
        import os
        from snnadv.models import SNN, get_spec
        from snnadv.models import record_spikes
        torch.manual_seed(0)
        base = SNN(get_spec("tiny", 10), num_steps=4, leak=0.95).to(device)
        base.set_thresholds({k: 0.25 for k in base.thresholds()})
        x = torch.rand(3, 3, 32, 32, device=device)
        res = {}
        for b in ("torch", "triton"):
            os.environ["SNNADV_SCAN"] = b
            model = SNN(get_spec("tiny", 10), num_steps=4, leak=0.95).to(device)
            model.load_state_dict(base.state_dict())
            model.set_thresholds(base.thresholds())
            torch.manual_seed(1)  # the same encoder spikes
            before = scan.RUNS.copy()
            with record_spikes(model) as spikes:
                logits = model(x)
            counts = [(c.sum().item(), c.numel() * spikes.steps[n]) for n, c in spikes.counts.items()]
            rate = sum(c for c, _ in counts) / sum(n for _, n in counts)
            logits.square().sum().backward()
            res[b] = (logits.detach(), [p.grad for p in model.parameters()])
            if b == "triton":
                kernel_errors = []
                kernel_ran(before, kernel_errors)
        del os.environ["SNNADV_SCAN"]
        errors = kernel_errors + ([] if torch.equal(res["torch"][0], res["triton"][0]) else ["logits differ"])
        for a, b in zip(res["torch"][1], res["triton"][1]):
            try:
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
            except AssertionError as e:
                errors.append(f"weight gradient: {e}")
        print(json.dumps({"case": "SNN step (tiny, T=4)", "errors": errors, "rate": rate}), flush=True)


    if __name__ == "__main__":
        main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
''')


def _check(lines: list[str]) -> None:
    results = [json.loads(line) for line in lines if line.startswith("{")]
    failed = [f"{r['case']}: {'; '.join(r['errors'])}" for r in results if r["errors"]]
    assert not failed, "Triton scan differs from _LIFScan:\n" + "\n".join(failed)
    assert len(results) == 12 + 3 + 3 + 1 + 1 + 1, f"expected 21 cases, got {len(results)}"
    for r in results:  # the inputs exercise both spiking and silent neurons
        assert 0.1 < r["rate"] < 0.6, f"{r['case']}: spike rate {r['rate']:.2f}"


def test_triton_scan_matches_torch_under_interpreter(tmp_path):
    """CPU: the kernels under the Triton interpreter equal _LIFScan (T=6, N=300)."""
    pytest.importorskip("triton", reason="Triton is not installed: the Triton scan cannot run")
    script = tmp_path / "compare_triton_scan.py"
    script.write_text(COMPARE)
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(script), "6", "300", "cpu"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"comparison script failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    _check(proc.stdout.splitlines())


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: the Triton kernel runs there; CI checks it under the interpreter")
def test_triton_scan_matches_torch_on_cuda(capsys):
    """GPU: the compiled kernels equal _LIFScan at T=32, N=100000."""
    pytest.importorskip("triton", reason="Triton is not installed: the Triton scan cannot run")
    namespace = {"__name__": "compare_triton_scan"}
    exec(compile(COMPARE, "compare_triton_scan", "exec"), namespace)
    namespace["main"](32, 100_000, "cuda")
    _check(capsys.readouterr().out.splitlines())


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_a_failing_kernel_falls_back_to_the_pytorch_scan(monkeypatch, where):
    """The kernels have not run on a GPU yet: a compile or launch failure must not stop a
    run. It warns once and the PyTorch scan computes the same result."""
    pytest.importorskip("triton", reason="Triton is not installed: the Triton scan cannot run")
    from snnadv.kernels import triton_scan
    from snnadv.kernels.scan import _LIFScan
    from snnadv.surrogates import SpikeTime

    def fail(*args, **kwargs):
        raise RuntimeError("simulated compile failure")

    monkeypatch.setattr(triton_scan, "_interpreting", lambda: True)  # accept CPU tensors
    monkeypatch.setattr(triton_scan.STATE, "broken", None)
    monkeypatch.setattr(triton_scan, "_launch_" + where, fail)
    if where == "backward":  # a forward that "ran" on the kernel: the PyTorch one fills its outputs
        def forward(current, mem0, dt0, spikes, bits, mems, memT, dtT, T, N, leak, thr, hard, keep_mem, keep_bits):
            out, m, d = _LIFScan.apply(current, mem0, dt0, leak, thr, hard, SpikeTime())
            spikes.copy_(out), bits.copy_(out.to(torch.uint8)), memT.copy_(m), dtT.copy_(d)
        monkeypatch.setattr(triton_scan, "_launch_forward", forward)
    torch.manual_seed(0)
    cur, mem0, dt0 = torch.randn(5, 40) * 0.6 + 0.4, torch.zeros(40), torch.full((40,), 1000.0)
    results = []
    for triton_first, fn in ((True, triton_scan.TritonLIFScan.apply), (False, _LIFScan.apply)):
        c = cur.clone().requires_grad_(True)
        with pytest.warns(RuntimeWarning, match="simulated") if triton_first else contextlib.nullcontext():
            spk, mem, dt = fn(c, mem0, dt0, 0.9, 1.0, False, SpikeTime(beta=0.05))
            spk.sum().backward()
        results.append((spk.detach(), mem.detach(), dt, c.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert triton_scan.STATE.broken and "simulated" in triton_scan.STATE.broken and not triton_scan.available()


def test_the_comparison_fails_when_the_kernel_does_not_run(monkeypatch, capsys):
    """The CUDA comparison must not compare PyTorch with PyTorch: with every kernel launch
    failing (and falling back), the comparison reports that the kernel did not run, and a
    forced Triton backend (strict) stops with an error."""
    pytest.importorskip("triton", reason="Triton is not installed: the Triton scan cannot run")
    from snnadv.errors import SnnadvError
    from snnadv import kernels
    from snnadv.kernels import scan, triton_scan

    def fail(*args, **kwargs):
        raise RuntimeError("simulated launch failure")

    monkeypatch.setattr(triton_scan, "_interpreting", lambda: True)  # accept CPU tensors
    monkeypatch.setattr(triton_scan.STATE, "broken", None)
    monkeypatch.setattr(triton_scan, "_launch_forward", fail)
    monkeypatch.setattr(triton_scan, "_launch_backward", fail)
    namespace = {"__name__": "compare_triton_scan"}
    exec(compile(COMPARE, "compare_triton_scan", "exec"), namespace)
    with pytest.warns(RuntimeWarning, match="simulated"), pytest.raises(SnnadvError, match="simulated"):
        namespace["main"](4, 40, "cpu")  # the forced-Triton cases raise instead of falling back
    with pytest.raises(AssertionError, match="did not run"):
        _check(capsys.readouterr().out.splitlines())
    before = scan.RUNS.copy()
    with pytest.raises(SnnadvError, match="Triton LIF scan failed in forward"):
        kernels.lif_scan(torch.rand(3, 8), torch.zeros(8), torch.full((8,), 1000.0), 0.9, 1.0, False,
                      namespace["SpikeTime"](), backend="triton")
    assert scan.runs_since(before) == {"forward:triton-failed": 1}


def test_forward_kernel_keeps_no_spike_copy_without_a_gradient(monkeypatch):
    """Without autograd the forward kernel is told not to write the uint8 spikes (and no
    T x N uint8 tensor is allocated); with it, it writes them for backward."""
    pytest.importorskip("triton", reason="Triton is not installed: the Triton scan cannot run")
    from snnadv.kernels import triton_scan
    from snnadv.surrogates import SpikeTime

    seen = []

    def record(current, mem0, dt0, spikes, bits, mems, memT, dtT, T, N, leak, thr, hard, keep_mem, keep_bits):
        seen.append((keep_bits, tuple(bits.shape), bits.dtype))

    monkeypatch.setattr(triton_scan, "_interpreting", lambda: True)
    monkeypatch.setattr(triton_scan, "_launch_forward", record)
    args = (torch.zeros(1000), torch.full((1000,), 1000.0), 0.9, 1.0, False, SpikeTime())
    with torch.no_grad():
        triton_scan.TritonLIFScan.apply(torch.rand(7, 1000), *args)
    triton_scan.TritonLIFScan.apply(torch.rand(7, 1000, requires_grad=True), *args)
    assert seen == [(False, (7, 1000), torch.float32), (True, (7, 1000), torch.uint8)]
