"""The neuron as an extension point: LIF takes snnTorch's keywords (and equals the older
``leak=`` path), snnTorch surrogate functions on both execution paths, a registered
plugin neuron builds an SNN, is converted and round-trips a checkpoint, the spike
recorder and Algorithm 1's capture as context managers, and no import cycle among
the neurons, surrogates and kernels."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import snntorch
import torch
from snntorch import surrogate as snn_surrogate

import snnadv
from snnadv.checkpoint import load_model, model_settings, save_checkpoint, weights
from snnadv.conversion import ConversionSettings, balance, build_snn
from snnadv.encoding import encoder_generator
from snnadv.errors import CheckpointError, SnnadvError
from snnadv.models import SNN, get_spec, record_spikes
from snnadv.neurons import LIF, Neuron, reset_state
from snnadv.surrogates import FastSigmoid, LinearSurrogate, SpikeTime, from_snntorch

ROOT = Path(__file__).resolve().parents[1]


def _currents(T=30, shape=(4, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, *shape, generator=g) * 0.7 + 0.4


def _steps(neuron, cur):
    """Spikes, final membrane and d(weighted spikes)/d(current), step by step."""
    reset_state(neuron)
    cur = cur.clone().requires_grad_(True)
    spk = torch.stack([neuron(c)[0] for c in cur])
    w = torch.linspace(-1, 1, spk.numel()).reshape(spk.shape)
    (grad,) = torch.autograd.grad((spk * w).sum(), cur)
    return spk.detach(), neuron.mem.detach(), grad


def _fused(neuron, cur):
    neuron.reset_state()
    cur = cur.clone().requires_grad_(True)
    spk = neuron.multistep(cur)
    w = torch.linspace(-1, 1, spk.numel()).reshape(spk.shape)
    (grad,) = torch.autograd.grad((spk * w).sum(), cur)
    return spk.detach(), neuron.mem.detach(), grad


# -- LIF with snnTorch's keywords ----------------------------------------------------------


@pytest.mark.parametrize("reset", ["subtract", "zero"])
def test_snntorch_keywords_equal_the_leak_path(reset):
    """``LIF(beta=, threshold=, reset_mechanism=, spike_grad=)`` is ``LIF(leak=, reset=,
    surrogate=)`` bit for bit, on both paths (spikes, membrane, gradients)."""
    cur = _currents()
    ours = LIF(beta=0.95, threshold=0.8, reset_mechanism=reset, spike_grad=LinearSurrogate(0.3))
    old = LIF(leak=0.95, threshold=0.8, reset=reset, surrogate=LinearSurrogate(0.3))
    positional = LIF(0.95, 0.8, LinearSurrogate(0.3), reset_mechanism=reset)  # snnTorch's argument order
    for run in (_steps, _fused):
        a, b, c = run(ours, cur), run(old, cur), run(positional, cur)
        assert a[0].sum() > 10
        for x, y, z in zip(a, b, c):
            assert torch.equal(x, y) and torch.equal(x, z)
    assert LIF(beta=0.95, threshold=1.0).leak == pytest.approx(0.95)  # the call the issue quotes


def test_snntorch_keywords_match_snntorch_leaky():
    cur = _currents(T=50)
    ref = snntorch.Leaky(beta=0.9, threshold=0.7, reset_mechanism="zero")
    lif = LIF(beta=0.9, threshold=0.7, reset_mechanism="zero")
    ref.reset_mem()
    for t in range(cur.shape[0]):
        s_ref, m_ref = ref(cur[t])
        s, m = lif(cur[t])
        assert torch.equal(s, s_ref) and torch.equal(m, m_ref)


def test_no_reset_matches_snntorch_and_the_fused_path():
    """``reset_mechanism="none"`` (pure integration), as snnTorch; the scan agrees."""
    cur = _currents() * 0.3
    ref = snntorch.Leaky(beta=0.8, threshold=0.5, reset_mechanism="none")
    lif = LIF(beta=0.8, threshold=0.5, reset_mechanism="none", spike_grad=SpikeTime(0.3, 0.05), dt_init=20.0)
    ref.reset_mem()
    for t in range(cur.shape[0]):
        assert torch.equal(lif(cur[t])[0], ref(cur[t])[0])
    step, fused = _steps(lif, cur), _fused(lif, cur)
    assert 10 < step[0].sum() < step[0].numel() - 10
    assert torch.equal(step[0], fused[0])
    torch.testing.assert_close(fused[1], step[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(fused[2], step[2], rtol=1e-5, atol=1e-7)


def test_init_hidden_and_output_as_snntorch():
    x = torch.full((3,), 0.6)
    hidden = LIF(beta=1.0, init_hidden=True)
    assert torch.equal(hidden(x), torch.zeros(3)) and torch.equal(hidden(x), torch.ones(3))  # spk only
    both = LIF(beta=1.0, init_hidden=True, output=True)
    spk, mem = both(x)
    assert torch.equal(spk, torch.zeros(3)) and torch.equal(mem, x)


def test_giving_a_setting_twice_or_an_unsupported_one_is_an_error():
    for kw in (dict(beta=0.9, leak=0.9), dict(reset="zero", reset_mechanism="zero"),
               dict(surrogate=SpikeTime(), spike_grad=SpikeTime())):
        with pytest.raises(SnnadvError, match="not both"):
            LIF(**kw)
    with pytest.raises(SnnadvError, match="learn_threshold"):
        LIF(beta=0.9, learn_threshold=True)
    LIF(beta=0.9, learn_beta=False, graded_spikes_factor=1.0, reset_delay=True)  # defaults are fine
    with pytest.raises(TypeError):
        LIF(beta=0.9, no_such_keyword=1)
    with pytest.raises(SnnadvError, match="leak"):
        LIF(beta=torch.tensor([0.9, 0.8]))
    with pytest.raises(SnnadvError, match="spike_grad"):
        LIF(spike_grad="atan")


# -- snnTorch's surrogate functions -----------------------------------------------------------


@pytest.mark.parametrize("path", [_steps, _fused])
def test_snntorch_fast_sigmoid_is_the_builtin_on_both_paths(path):
    lif = LIF(beta=0.9, threshold=1.0, spike_grad=snn_surrogate.fast_sigmoid(slope=25))
    assert isinstance(lif.surrogate, FastSigmoid) and lif.surrogate.slope == 25.0
    assert from_snntorch(snn_surrogate.atan()) is None
    ref = snntorch.Leaky(beta=0.9, threshold=1.0, spike_grad=snn_surrogate.fast_sigmoid(slope=25))
    cur = _currents()
    spk, mem, grad = path(lif, cur)
    spk_ref, mem_ref, grad_ref = _steps(ref, cur)
    assert torch.equal(spk, spk_ref)
    torch.testing.assert_close(mem, mem_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-7)


def test_other_snntorch_surrogates_run_step_by_step_and_the_fused_path_refuses_them():
    atan = snn_surrogate.atan()
    lif = LIF(beta=0.9, threshold=1.0, spike_grad=atan)
    ref = snntorch.Leaky(beta=0.9, threshold=1.0, spike_grad=atan)
    cur = _currents()
    for a, b in zip(_steps(lif, cur), _steps(ref, cur)):
        assert torch.equal(a, b)
    with pytest.raises(SnnadvError, match="fused.*atan"):
        lif.multistep(cur)
    # in an SNN: the reference mode runs it, the fused mode says why it cannot
    torch.manual_seed(0)
    snn = SNN(get_spec("tiny", 10), num_steps=3, surrogate=atan, mode="reference")
    assert snn(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    snn.mode = "fused"
    with pytest.raises(SnnadvError, match="atan"):
        snn(torch.rand(2, 3, 32, 32))


# -- a plugin neuron ----------------------------------------------------------------------------


class ToyIF(Neuron):
    """An IF neuron with an input gain and a hard reset, in plain PyTorch (no fused path:
    the protocol's default :meth:`multistep` loops ``forward``)."""

    def __init__(self, leak=1.0, threshold=1.0, reset="zero", surrogate=None, gain=1.0):
        super().__init__()
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self.gain = float(gain)
        self.surrogate = surrogate
        self.mem = None

    def params(self):
        return {"gain": self.gain}

    def reset_state(self):
        self.mem = None

    def forward(self, input_, mem=None):
        u = (self.mem if self.mem is not None else torch.zeros_like(input_)) + self.gain * input_
        spk = (u > self.threshold).to(u.dtype) + (u - u.detach())  # value: the spike; gradient: 1
        self.mem = u * (1.0 - spk.detach())
        return spk, self.mem


@pytest.fixture
def toy_neuron():
    snnadv.register_neuron("toy-if")(ToyIF)
    yield ToyIF
    snnadv.NEURONS.unregister("toy-if")


def _checkpoint(snn: SNN) -> dict:
    return {"stage": "snn-conv", "dataset": "cifar10", "spec": snn.spec.to_dict(), "model": model_settings(snn),
            "state_dict": weights(snn), "config": {}, "metrics": {}, "parent": None, "train_state": None}


def test_a_registered_neuron_builds_an_snn_and_round_trips_a_checkpoint(toy_neuron, tmp_path):
    torch.manual_seed(0)
    snn = SNN(get_spec("tiny", 10), num_steps=5, neuron="toy-if", neuron_params={"gain": 0.5})
    assert all(isinstance(n, ToyIF) and n.gain == 0.5 for n in snn.neurons) and len(snn.neurons) == 3
    snn.set_thresholds({"act1": 0.3, "act2": 0.2, "act3": 0.1})
    x = torch.rand(2, 3, 32, 32)
    with encoder_generator(snn, torch.Generator().manual_seed(1)):
        fused = snn(x)
    snn.mode = "reference"
    with encoder_generator(snn, torch.Generator().manual_seed(1)):
        ref = snn(x)
    snn.mode = "fused"
    torch.testing.assert_close(fused, ref, rtol=1e-6, atol=1e-6)
    path = save_checkpoint(tmp_path / "toy.pt", _checkpoint(snn))
    loaded = load_model(path)
    assert loaded.neuron == "toy-if" and all(isinstance(n, ToyIF) and n.gain == 0.5 for n in loaded.neurons)
    assert loaded.thresholds() == pytest.approx(snn.thresholds()) and loaded.kind == "snn-conv"
    with encoder_generator(loaded, torch.Generator().manual_seed(1)):
        assert torch.equal(loaded(x), fused)
    # without the plugin the checkpoint cannot be rebuilt: one line says which neuron
    snnadv.NEURONS.unregister("toy-if")
    with pytest.raises(CheckpointError, match="toy-if"):
        load_model(path)


def test_a_registered_neuron_is_converted(toy_neuron):
    spec = get_spec("tiny", 10)
    settings = ConversionSettings(timesteps=4, percentile=100.0, neuron="toy-if")
    torch.manual_seed(0)
    snn = build_snn(spec, settings)
    assert all(isinstance(n, ToyIF) for n in snn.neurons) and snn.kind == "snn-conv"
    images = [torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))]
    thr = balance(snn, images, settings, torch.Generator().manual_seed(3))
    assert list(thr) == ["act1", "act2", "act3"] and all(v > 0 for v in thr.values())
    assert all(not n._current_hooks for n in snn.neurons) and snn.encoder.generator is None
    with pytest.raises(SnnadvError, match="unknown neuron 'toy-iff'.*did you mean 'toy-if'"):
        ConversionSettings(neuron="toy-iff")


def test_old_checkpoints_without_a_neuron_load_as_lif(tmp_path):
    torch.manual_seed(0)
    snn = SNN(get_spec("tiny", 10), num_steps=4, leak=0.9)
    snn.set_thresholds({"act1": 0.5, "act2": 0.4, "act3": 0.3})
    ckpt = _checkpoint(snn)
    assert ckpt["model"]["neuron"] == "lif" and ckpt["model"]["neuron_params"] == {"dt_init": 1000.0}
    for key in ("neuron", "neuron_params"):
        del ckpt["model"][key]
    loaded = load_model(save_checkpoint(tmp_path / "old.pt", ckpt))
    assert loaded.neuron == "lif" and all(type(n) is LIF and n.dt_init == 1000.0 for n in loaded.neurons)
    x = torch.rand(2, 3, 32, 32)
    outs = []
    for model in (snn.eval(), loaded):
        with encoder_generator(model, torch.Generator().manual_seed(5)):
            outs.append(model(x))
    assert torch.equal(*outs)


# -- the spike recorder and Algorithm 1's capture -------------------------------------------------


def test_record_spikes_counts_every_layer_and_leaves_no_hook():
    torch.manual_seed(0)
    snn = SNN(get_spec("tiny", 10), num_steps=6, chunk_steps=4)
    snn.set_thresholds({n: 0.2 for n in snn.neuron_names})
    frames = (torch.rand(6, 2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) < 0.4).float()
    by_step = {}

    def count(name):
        def hook(module, inputs, out):
            by_step[name] = by_step.get(name, 0.0) + out[0].sum()
        return hook

    handles = [m.register_forward_hook(count(n)) for n, m in snn.named_modules() if isinstance(m, LIF)]
    snn.mode = "reference"
    with torch.no_grad():
        snn.forward_frames(frames)
    for h in handles:
        h.remove()
    for mode in ("reference", "fused"):
        snn.mode = mode
        with torch.no_grad(), record_spikes(snn) as spikes:
            snn.forward_frames(frames)
        assert list(spikes.counts) == snn.neuron_names and set(spikes.steps.values()) == {6}
        assert {n: float(c.sum()) for n, c in spikes.counts.items()} == {n: float(v) for n, v in by_step.items()}
        assert all(0 < r < 1 for r in spikes.mean_rates().values())
    assert all(not n._spike_hooks for n in snn.neurons)


def test_first_layer_capture_is_scoped():
    torch.manual_seed(0)
    snn = SNN(get_spec("tiny", 10), num_steps=4, chunk_steps=2)
    x = torch.rand(2, 3, 32, 32)
    with snn.capture_first_layer() as capture:
        with pytest.raises(SnnadvError, match="already"):
            with snn.capture_first_layer():
                pass
        loss = snn(x).sum()
        torch.autograd.grad(loss, capture.leaf)
        assert len(capture.chunks) == 2 and capture.total().shape == (2, 8, 32, 32)
    assert snn._capture is None
    snn(x)  # no capture outside the block


def test_building_and_running_an_snn_leaves_the_allocator_alone():
    code = ("import torch, snnadv.runtime as r\n"
            "from snnadv.models import SNN, get_spec\n"
            "SNN(get_spec('tiny', 10), num_steps=2)(torch.rand(1, 3, 32, 32))\n"
            "assert r._applied is None, r._applied\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


# -- imports ----------------------------------------------------------------------------------------

CORE = ["neurons", "surrogates", "registry", "kernels/__init__", "kernels/scan", "kernels/triton_scan",
        "kernels/linear"]


def _imports(rel: str, module_level_only: bool) -> set[str]:
    """The snnadv modules that ``snnadv/<rel>.py`` imports (dotted names)."""
    path = ROOT / "snnadv" / f"{rel}.py"
    package = ["snnadv", *rel.split("/")[:-1]]
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            if target.startswith("snnadv"):
                found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("snnadv"))
    own = {f"snnadv.{r.replace('/', '.')}".removesuffix(".__init__") for r in CORE}
    return {m for m in found if m in own}


def test_no_import_cycle_among_neurons_surrogates_and_kernels():
    names = {r: f"snnadv.{r.replace('/', '.')}".removesuffix(".__init__") for r in CORE}
    graph = {names[r]: _imports(r, module_level_only=True) for r in CORE}
    done, active = set(), []

    def visit(m):
        if m in active:
            raise AssertionError("import cycle: " + " -> ".join(active[active.index(m):] + [m]))
        if m in done:
            return
        active.append(m)
        for n in graph.get(m, ()):
            visit(n)
        active.pop()
        done.add(m)

    for m in graph:
        visit(m)
    for r in CORE:  # the kernels never import a neuron, not even inside a function
        if r.startswith("kernels"):
            assert "snnadv.neurons" not in _imports(r, module_level_only=False), r
    assert "snnadv.kernels.triton_scan" not in graph["snnadv.kernels.scan"]
    assert "snnadv.neurons" not in graph["snnadv.surrogates"]
    # and each can be the first one imported (in one fresh interpreter, snnadv forgotten in between)
    code = ("import importlib, sys\n"
            "for module in ('snnadv.kernels.triton_scan', 'snnadv.kernels.scan', 'snnadv.surrogates',\n"
            "               'snnadv.neurons'):\n"
            "    for name in [n for n in sys.modules if n == 'snnadv' or n.startswith('snnadv.')]:\n"
            "        del sys.modules[name]\n"
            "    importlib.import_module(module)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_surrogate_registry_is_what_the_names_come_from():
    assert list(snnadv.SURROGATES) == ["stdb", "linear", "fast-sigmoid"]
    assert snnadv.SURROGATES["stdb"] is SpikeTime and "lif" in snnadv.NEURONS
    assert [p for p in snnadv.GRADIENTS if p.startswith("bptt-")] == ["bptt-stdb", "bptt-linear", "bptt-fast-sigmoid"]
