"""Tests for snnadv.bench: the plain snnTorch baseline and the SpikingJelly peer compute
the same function as the SNN (so the speed-ups compare like with like), FLOP counting,
and a tiny end-to-end ``snnadv bench`` run through the CLI.

The SpikingJelly tests need the optional peer (``pip install -e ".[peers]"``) and are
skipped, saying so, without it; the bench's behaviour without it is tested either way."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import snntorch as snn
import torch

from snnadv import bench as bench_module
from snnadv.bench import (PlainSnnTorchNet, SpikingJellyNet, calibrate, count_spec, make_model, make_snn, plan,
                          run_bench, spike_rates, spikingjelly)
from snnadv.cli.main import main
from snnadv.errors import SnnadvError
from snnadv.models import ANN, SNN, get_spec
from snnadv.neurons import LIF
from snnadv.surrogates import make_surrogate

SJ, SJ_WHY = spikingjelly()
needs_spikingjelly = pytest.mark.skipif(SJ is None, reason=f"SpikingJelly is {SJ_WHY}")
#: the implementations a bench runs here
IMPLS = ("snnadv", "snntorch") + (("spikingjelly",) if SJ is not None else ())


@pytest.fixture(scope="module")
def tiny_net():
    spec = get_spec("tiny", 10)
    torch.manual_seed(0)
    weights = ANN(spec).state_dict()
    return spec, weights, calibrate(spec, weights, torch.device("cpu"), batch=2, timesteps=8)


@pytest.mark.parametrize("leak,scale", [(1.0, 1.0), (0.99, 0.7)])
def test_baseline_computes_the_same_logits(tiny_net, leak, scale):
    spec, weights, thr = tiny_net
    model = make_snn(spec, weights, {k: v * scale for k, v in thr.items()}, leak, "cpu").eval()
    assert isinstance(model, SNN)
    base = PlainSnnTorchNet.from_snn(model).eval()
    assert sum(isinstance(m, snn.Leaky) for m in base.modules()) == len(spec.activations)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 32, 32, generator=g)
    frames = (torch.rand(12, 3, 3, 32, 32, generator=g) < x).float()
    with torch.no_grad():
        a = model.forward_frames(frames)
        b = base.forward_frames(frames)
    assert a.abs().max() > 0  # the network is active: logits come from spikes
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    # every layer spikes, but not all the time
    rates = spike_rates(model, x, 12)
    assert set(rates) == set(spec.activations)
    assert all(0.0 < r < 0.5 for r in rates.values()), rates


def test_baseline_weights_are_the_snns(tiny_net):
    spec, weights, thr = tiny_net
    model = make_snn(spec, weights, thr, 1.0, "cpu")
    base = PlainSnnTorchNet.from_snn(model)
    for name, p in model.named_parameters():
        assert torch.equal(dict(base.named_parameters())[name], p)
    assert float(base.act2.threshold) == pytest.approx(thr["act2"])


def test_baseline_straight_through_input_gradient(tiny_net):
    spec, weights, thr = tiny_net
    base = PlainSnnTorchNet.from_snn(make_snn(spec, weights, thr, 0.99, "cpu")).eval()
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    torch.nn.functional.cross_entropy(base(x, 6), torch.tensor([0, 1])).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# ----------------------------------------------------------------- the SpikingJelly peer
class _FireAtOrAbove(torch.autograd.Function):
    """s = H(h - thr) firing at h >= thr (SpikingJelly's convention); the surrogate backward."""

    @staticmethod
    def forward(ctx, h, thr, surrogate):
        ctx.save_for_backward(h)
        ctx.thr, ctx.surrogate = thr, surrogate
        return (h >= thr).to(h.dtype)

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        return grad * ctx.surrogate.grad(h, ctx.thr, None), None, None


class _LeakedResetLIF(LIF):
    """The SNN's LIF with SpikingJelly's reset convention, step by step: the membrane kept
    is the one after the reset, so the subtracted threshold leaks with it:
    h[t] = lam * v[t-1] + I[t], s[t] = H(h[t] - thr), v[t] = h[t] - thr * s[t] (detached)."""

    def multistep(self, current):
        v = self.mem if self.mem.shape == current.shape[1:] else torch.zeros_like(current[0])
        out = []
        for i in current:
            h = self.leak * v + i
            s = _FireAtOrAbove.apply(h, self.thr, self.surrogate)
            v = h - self.thr * s.detach()
            out.append(s)
        self.mem = v
        return torch.stack(out)


def _twins(tiny_net, leak, scale, reset_convention="snnadv"):
    """(the SNN, its SpikingJelly twin) in eval mode, the SNN's surrogate set to the twin's
    (SuperSpike(alpha=1) = fast-sigmoid at slope 1); ``reset_convention="spikingjelly"``:
    the SNN's neurons swapped for :class:`_LeakedResetLIF`."""
    spec, weights, thr = tiny_net
    model = make_snn(spec, weights, {k: v * scale for k, v in thr.items()}, leak, "cpu").eval()
    model.set_surrogate(make_surrogate("fast-sigmoid", slope=1.0))
    twin = SpikingJellyNet.from_snn(model).eval()
    if reset_convention == "spikingjelly":
        for name in list(model.neuron_names):
            old = getattr(model, name)
            setattr(model, name, _LeakedResetLIF(leak=old.leak, threshold=old.thr, surrogate=old.surrogate))
    return model, twin


def _frames(T=12, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, 32, 32, generator=g)
    return x, (torch.rand(T, batch, 3, 32, 32, generator=g) < x).float()


def _spikes(model) -> list:
    """Hooks that collect every spiking layer's output spikes [T, B, ...] (SNN or twin)."""
    from spikingjelly.activation_based.neuron import BaseNode

    out = []
    for m in model.modules():
        if isinstance(m, LIF):
            m.register_spike_hook(out.append)
        elif isinstance(m, BaseNode):
            m.register_forward_hook(lambda mod, args, y: out.append(y.detach()))
    return out


def _grads(model, frames, labels) -> dict:
    model.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model.forward_frames(frames), labels).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


@needs_spikingjelly
@pytest.mark.parametrize("leak,scale,convention", [(1.0, 1.0, "snnadv"), (0.99, 0.7, "spikingjelly")])
def test_spikingjelly_twin_computes_the_same_network(tiny_net, leak, scale, convention):
    """IF (the converted network): the twin is the SNN exactly.  LIF at 0.99: the twin is
    the SNN with SpikingJelly's reset convention exactly (forward spikes and logits equal;
    a training step's gradients close, with the same surrogate)."""
    from spikingjelly.activation_based import neuron

    model, twin = _twins(tiny_net, leak, scale, convention)
    spec = model.spec
    node = neuron.IFNode if leak == 1.0 else neuron.LIFNode
    assert [type(m) for m in twin.modules() if isinstance(m, neuron.BaseNode)] == [node] * len(spec.activations)
    assert all(m.step_mode == "m" and m.v_reset is None and m.detach_reset for m in twin.modules()
               if isinstance(m, neuron.BaseNode))
    if leak != 1.0:  # u = lam * u + I: tau = 1 / (1 - lam), input not decayed
        lif = twin.act1
        assert lif.decay_input is False and 1.0 - 1.0 / lif.tau == pytest.approx(model.leak, abs=1e-12)
    for name, p in model.named_parameters():
        assert torch.equal(dict(twin.named_parameters())[name], p)
    assert twin.act2.v_threshold == pytest.approx(model.thresholds()["act2"])
    x, frames = _frames()
    a_spk, b_spk = _spikes(model), _spikes(twin)
    with torch.no_grad():
        a = model.forward_frames(frames)
        b = twin.forward_frames(frames)
    assert a.abs().max() > 0 and len(a_spk) == len(b_spk) == len(spec.activations)
    for s, t in zip(a_spk, b_spk):
        assert 0 < s.sum() < s.numel() and torch.equal(s.float(), t)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    # the same encoder draws: images in, the same seed, the same logits
    torch.manual_seed(5)
    a = model(x, 12)
    torch.manual_seed(5)
    torch.testing.assert_close(twin(x, 12), a, rtol=1e-5, atol=1e-5)
    # a training step: the gradients of every weight agree
    y = torch.tensor([0, 1, 2])
    ga, gb = _grads(model, frames, y), _grads(twin, frames, y)
    for k in ga:
        assert ga[k].abs().max() > 0, k
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-4, atol=1e-5 * float(ga[k].abs().max()))


@needs_spikingjelly
def test_spikingjelly_lif_differs_from_the_snn_only_by_its_reset(tiny_net):
    """With the SNN's own LIF (the reset not leaked) the twin fires nearly as often: the two
    conventions differ by 1 % of a threshold per spike at leak 0.99."""
    model, twin = _twins(tiny_net, 0.99, 0.7)
    _, frames = _frames(T=16)
    a_spk, b_spk = _spikes(model), _spikes(twin)
    with torch.no_grad():
        model.forward_frames(frames)
        twin.forward_frames(frames)
    for s, t in zip(a_spk, b_spk):
        ra, rb = float(s.float().mean()), float(t.mean())
        assert rb >= ra > 0 and rb - ra <= 0.05 * ra, (ra, rb)  # its reset subtracts less: a few more spikes


@needs_spikingjelly
def test_spikingjelly_twin_bf16(tiny_net):
    """bf16: synaptic layers under autocast, the membranes stay fp32, as the SNN's bf16
    (whose logits it nearly equals; both differ from fp32 by a few flipped spikes)."""
    spec, weights, thr = tiny_net
    twin = make_model("spikingjelly", spec, weights, thr, 1.0, "cpu", {"precision": "bf16", "chunk_steps": 4}).eval()
    model = make_model("snnadv", spec, weights, thr, 1.0, "cpu", {"precision": "bf16"}).eval()
    _, frames = _frames()
    with torch.no_grad():
        b, a = twin.forward_frames(frames), model.forward_frames(frames)
    assert twin.precision == "bf16" and twin.act1.v.dtype == torch.float32 and b.dtype == torch.float32
    assert (b - a).abs().max() <= 0.02 * a.abs().max()


def test_bench_without_spikingjelly(monkeypatch):
    """Without SpikingJelly: one line says it is skipped and why, its rows are absent."""
    from io import StringIO

    from rich.console import Console

    from snnadv.report import Reporter

    why = 'not installed (No module named \'spikingjelly\'; pip install -e ".[peers]" && pip install --no-deps spikingjelly)'
    monkeypatch.setattr(bench_module, "spikingjelly", lambda: (None, why))
    buf = StringIO()
    r = run_bench({"preset": "tiny", "device": "cpu", "only": "snn_infer"},
                  Reporter(console=Console(file=buf, width=200)))
    assert [row["impl"] for row in r["rows"]] == ["snnadv", "snntorch"]
    assert r["speedups_vs_spikingjelly"] == {} and r["peers"]["spikingjelly"]["available"] is False
    lines = [l for l in buf.getvalue().splitlines() if "spikingjelly" in l.lower()]
    assert lines == [f"spikingjelly: skipped, SpikingJelly is {why}"]
    spec = get_spec("tiny", 10)
    with pytest.raises(SnnadvError, match=r"SpikingJelly is not installed.*peers"):
        make_model("spikingjelly", spec, ANN(spec).state_dict(), {}, 1.0, "cpu")
    # the check itself: an import that fails is a reason, not an exception
    monkeypatch.setitem(sys.modules, "spikingjelly", None)
    sj, reason = spikingjelly.__wrapped__()
    assert sj is None and reason.startswith("not installed (") and '".[peers]"' in reason


def test_count_spec_vgg5():
    c = count_spec(get_spec("vgg5", 10))
    # conv1 + conv2 + conv3 + fc + fc + classifier (2 FLOPs per MAC)
    assert c["flops"] == 3_538_944 + 37_748_736 + 75_497_472 + 16_777_216 + 2_097_152 + 20_480
    assert c["neurons"] == 64 * 32 * 32 + 2 * 128 * 16 * 16 + 2 * 1024


def test_plan_overrides():
    _, arch, work = plan({"preset": "cpu", "timesteps": "snn_train=8,pgd=4", "iters": 2, "only": "snn_train,pgd",
                          "batch_size": 3}, torch.device("cpu"))
    assert arch == "vgg5" and list(work) == ["snn_train", "pgd"]
    assert work["snn_train"]["timesteps"] == 8 and work["pgd"]["timesteps"] == 4
    assert all(s["iters"] == 2 and s["batch"] == 3 for s in work.values())
    assert plan({"preset": "auto"}, torch.device("cpu"))[0] == "cpu"


def test_bench_cli_tiny(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--out", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {(r["workload"], r["impl"]) for r in rows} == {("ann_train", "torch")} | {
        (w, i) for w in ("snn_train", "snn_infer", "pgd") for i in IMPLS}
    for r in rows:
        assert r["images_per_s"] > 0 and r["seconds"] > 0
        assert r["batch"] == 2 and r["timesteps"] == (1 if r["workload"] == "ann_train" else 4)
        assert r["hardware"]["flops_per_image"] > 0
    assert set(result["speedups"]) == {"snn_train", "snn_infer", "pgd"}
    assert all(v > 0 for v in result["speedups"].values())
    assert result["torch"] == torch.__version__ and result["threads"] >= 1 and result["device"] == "cpu"
    assert set(result["spike_rates"]) == {"snn_conv", "snn_bp"}
    assert set(result["speedups_vs_spikingjelly"]) == ({"snn_train", "snn_infer", "pgd"} if SJ else set())
    assert result["peers"]["spikingjelly"]["available"] is (SJ is not None)


def test_bench_cli_errors(capsys):
    assert main(["bench", "--only", "nope", "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "nope" in err and "\n" not in err
    assert main(["bench", "--timesteps", "x=1", "--device", "cpu", "--quiet"]) == 2


def test_run_bench_snnadv_options():
    r = run_bench({"preset": "tiny", "device": "cpu", "only": "snn_train", "precision": "bf16", "chunk_steps": 2})
    assert r["snnadv_options"]["precision"] == "bf16" and r["snnadv_options"]["chunk_steps"] == 2
    assert [row["workload"] for row in r["rows"]] == ["snn_train"] * len(IMPLS)
    assert all(row["images_per_s"] > 0 for row in r["rows"])
    # which scan ran is recorded (here the PyTorch one, both directions; none for the peers)
    assert r["rows"][0]["scan"]["forward:torch"] > 0 and r["rows"][0]["scan"]["backward:torch"] > 0
    assert all(row["scan"] == {} for row in r["rows"][1:])
    # both precisions in one run: a row each, each compared with the same fp32 baseline
    # (and with SpikingJelly in the same precision)
    r = run_bench({"preset": "tiny", "device": "cpu", "only": "snn_train", "precision": "fp32,bf16"})
    runs = [(row["impl"], row["precision"]) for row in r["rows"]]
    assert runs == [("snnadv", "fp32"), ("snnadv", "bf16"), ("snntorch", "fp32")] + \
        ([("spikingjelly", "fp32"), ("spikingjelly", "bf16")] if SJ else [])
    base = r["rows"][2]["images_per_s"]
    assert r["speedups"] == {"snn_train": r["rows"][0]["images_per_s"] / base,
                             "snn_train:bf16": r["rows"][1]["images_per_s"] / base}
    if SJ:
        assert r["speedups_vs_spikingjelly"] == {
            "snn_train": r["rows"][0]["images_per_s"] / r["rows"][3]["images_per_s"],
            "snn_train:bf16": r["rows"][1]["images_per_s"] / r["rows"][4]["images_per_s"]}
    assert [g["goal"][-6:] for g in goals(r) if "snnTorch" in g["goal"]] == ["(fp32)", "(bf16)"]
    assert [g["goal"][-6:] for g in goals(r) if "SpikingJelly" in g["goal"]] == (["(fp32)", "(bf16)"] if SJ else [])
    with pytest.raises(SnnadvError, match="fp16"):
        run_bench({"preset": "tiny", "device": "cpu", "precision": "fp16"})


# ----------------------------------------------------------------- the speed goals (of the issue that asked for them)
def goals(result: dict) -> list[dict]:
    """The speed goals, checked against a bench result (``applies``: its settings match the goal's)."""
    cuda, arch, out = result["device"].startswith("cuda"), result["arch"], []
    for row in result["rows"]:
        if row["impl"] != "snnadv" or row["workload"] not in ("snn_train", "snn_infer"):
            continue
        found = []
        if row["workload"] == "snn_train":
            paper = arch == "vgg5" and row["timesteps"] == 100 and row["batch"] >= 64
            if row.get("speedup") is not None:
                if cuda:
                    found.append({"goal": "SNN-BP training VGG5 T=100 batch>=64: >= 20x plain snnTorch",
                                  "value": row["speedup"], "target": 20.0, "met": row["speedup"] >= 20.0,
                                  "applies": paper})
                else:
                    found.append({"goal": "CPU: SNN-BP training VGG5 T=32 batch 16: >= 2x plain snnTorch",
                                  "value": row["speedup"], "target": 2.0, "met": row["speedup"] >= 2.0,
                                  "applies": arch == "vgg5" and row["timesteps"] == 32 and row["batch"] == 16})
            peer = row.get("speedup_vs_spikingjelly")
            if peer is not None and not cuda:  # the peer check of the issue that added SpikingJelly
                target = 1.5 if row.get("precision") == "bf16" else 1.2
                found.append({"goal": f"CPU: SNN-BP training VGG5 T=32 batch 16: >= {target}x SpikingJelly",
                              "value": peer, "target": target, "met": peer >= target,
                              "applies": arch == "vgg5" and row["timesteps"] == 32 and row["batch"] == 16})
            if cuda:
                found.append({"goal": "SNN-BP training VGG5 T=100 batch>=64: >= 2000 images/s",
                              "value": row["images_per_s"], "target": 2000.0, "met": row["images_per_s"] >= 2000.0,
                              "applies": paper})
        elif cuda:
            sec = 10000 / row["images_per_s"]
            found.append({"goal": "SNN evaluation T=2500 of 10,000 test images: < 120 s", "value": sec,
                          "target": 120.0, "met": sec < 120.0,
                          "applies": arch == "vgg5" and row["timesteps"] == 2500})
        for g in found:
            g["goal"] += f" ({row.get('precision', 'fp32')})"
        out += found
    return out


@pytest.mark.skipif(not os.environ.get("SNNADV_BENCH_RESULT"), reason="set SNNADV_BENCH_RESULT to a bench JSON")
def test_bench_result_meets_the_goals():
    """``SNNADV_BENCH_RESULT=runs/bench.json pytest -k goals``: every goal whose settings apply is met."""
    result = json.loads(Path(os.environ["SNNADV_BENCH_RESULT"]).read_text())
    missed = [g for g in goals(result) if g["applies"] and not g["met"]]
    assert not missed, missed
