"""Extending snnadv from outside the package: a new neuron and a new attack, defined in
this file only, registered, and run through the whole pipeline (convert -> finetune ->
attack with Algorithm 1 and BPTT -> evaluate), from Python and from the command line.

The command line finds them through the plugin mechanism: ``SNNADV_PLUGINS=test_plugins``
with this folder on ``PYTHONPATH`` (an installed plugin would use the ``snnadv.plugins``
entry-point group instead).  Nothing in the package names them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import snnadv
from snnadv.attacks import Attack
from snnadv.neurons import Neuron
from snnadv.surrogates import make_surrogate


# ----------------------------------------------------------------------------- the plugin
class _Fire(torch.autograd.Function):
    """s = H(u - thr) forward; the neuron's surrogate ds/du backward."""

    @staticmethod
    def forward(ctx, mem, thr, dt, surrogate):
        ctx.save_for_backward(mem, thr, dt)
        ctx.surrogate = surrogate
        return (mem > thr).to(mem.dtype)

    @staticmethod
    def backward(ctx, grad):
        mem, thr, dt = ctx.saved_tensors
        return grad * ctx.surrogate.grad(mem, thr, dt), None, None, None


@snnadv.register_neuron("alif")
class AdaptiveLIF(Neuron):
    """LIF with an adaptive threshold (ALIF): each spike raises the neuron's threshold by
    ``adapt`` times the base threshold, and the rise relaxes by ``rho`` per step::

        u[t]   = beta * u[t-1] + I[t]                 (Eq. 3 without the reset term)
        thr[t] = threshold * (1 + a[t])
        s[t]   = H(u[t] - thr[t]);  u[t] -= s[t] * thr[t]   (soft reset)
        a[t+1] = rho * a[t] + adapt * s[t]

    Single step only (the SNN loops ``forward``); the surrogate is swappable, so the
    ``bptt-<surrogate>`` attack paths apply.
    """

    def __init__(self, leak: float = 0.99, threshold: float = 1.0, reset: str = "subtract", surrogate=None,
                 adapt: float = 0.2, rho: float = 0.9):
        super().__init__()
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self.beta, self.adapt, self.rho = float(leak), float(adapt), float(rho)
        self.surrogate = surrogate or make_surrogate("stdb")
        self.reset_state()

    @property
    def leak(self) -> float:
        return self.beta

    def set_leak(self, value: float) -> None:
        self.beta = float(value)

    def params(self) -> dict:
        return {"adapt": self.adapt, "rho": self.rho}

    def reset_state(self) -> None:
        self.mem = self.a = self.dt = None

    def forward(self, input_, mem=None):
        if self.mem is None or self.mem.shape != input_.shape:
            self.mem, self.a = torch.zeros_like(input_), torch.zeros_like(input_)
            self.dt = torch.full_like(input_, 1000.0)
        thr = self.threshold * (1.0 + self.a)
        self.mem = self.beta * self.mem + input_
        spk = _Fire.apply(self.mem, thr, self.dt, self.surrogate)
        self.mem = self.mem - spk.detach() * thr
        self.a = self.rho * self.a + self.adapt * spk.detach()
        self.dt = torch.where(spk.detach() > 0, torch.ones_like(self.dt), self.dt + 1.0)
        return spk, self.mem


@snnadv.register_attack("mifgsm")
class MomentumFGSM(Attack):
    """MI-FGSM (Dong et al., CVPR 2018): the sign step follows a running sum of the
    L1-normalised gradients, g <- decay * g + grad / mean|grad|, within the eps-ball."""

    name = "mifgsm"

    def __init__(self, model, eps=8 / 255, alpha=2 / 255, steps=5, gradient=None, targeted=False, decay=1.0):
        super().__init__(model, eps, gradient, targeted)
        self.alpha, self.steps, self.decay = float(alpha), int(steps), float(decay)

    def forward(self, images, labels, target_labels=None):
        x, g = images.clone(), torch.zeros_like(images)
        for _ in range(self.steps):
            direction_labels = target_labels if self.targeted else labels
            grad, _ = self.input_gradient(x, direction_labels)
            grad = -grad if self.targeted else grad
            g = self.decay * g + grad / grad.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
            x = self.project(x + self.alpha * g.sign(), images)
        return x


# ----------------------------------------------------------------------------- the tests
TINY = dict(data_dir=None, device="cpu", seed=0, quiet=True)


def _cfg(stage: str, shared_data, **kw) -> dict:
    from snnadv.config import resolve

    return resolve(stage, flags={**TINY, "data_dir": str(shared_data), **kw})


@pytest.fixture(scope="module")
def tiny_ann(shared_data, tmp_path_factory) -> Path:
    from snnadv.train import train_ann

    out = tmp_path_factory.mktemp("plugin") / "ann.pt"
    train_ann(_cfg("train-ann", shared_data, arch="tiny", epochs=2, lr=0.05, milestones=[], batch_size=64,
                   train_subset=1000, test_subset=100, out=str(out)))
    return out


def test_the_plugin_neuron_single_step_matches_its_equations():
    """Constant input 0.6, threshold 1, leak 1, adapt 0.5, rho 0.5, worked by hand:
    u = .6, 1.2 (> 1: spike, u .2, a .5), .8 (< 1.5), 1.4 (> 1.25: spike, u .15, a .625),
    .75 (< 1.625), 1.35 (> 1.3125: spike), .6375 (< 1.65625), 1.2375 (< 1.328125);
    without adaptation the same input spikes more often."""
    n = AdaptiveLIF(leak=1.0, threshold=1.0, adapt=0.5, rho=0.5)
    assert [float(n(torch.tensor([0.6]))[0]) for _ in range(8)] == [0, 1, 0, 1, 0, 1, 0, 0]
    plain = AdaptiveLIF(leak=1.0, threshold=1.0, adapt=0.0, rho=0.5)
    assert sum(float(plain(torch.tensor([0.6]))[0]) for _ in range(8)) >= 4


def test_plugin_neuron_and_attack_through_the_pipeline_from_python(shared_data, tiny_ann, tmp_path):
    from snnadv.adaptive import run_evaluate
    from snnadv.checkpoint import load_model
    from snnadv.convert import convert
    from snnadv.robustness import run_attack
    from snnadv.train import finetune

    conv = convert(_cfg("convert", shared_data, checkpoint=str(tiny_ann), neuron="alif", timesteps=8, curve=[4, 8],
                        batch_size=32, test_subset=50, out=str(tmp_path / "conv.pt")))
    snn = load_model(conv["checkpoint"])
    assert snn.neuron == "alif" and all(isinstance(n, AdaptiveLIF) for n in snn.neurons)
    assert all(t > 0 for t in snn.thresholds().values())

    bp = finetune(_cfg("finetune", shared_data, checkpoint=conv["checkpoint"], timesteps=8, epochs=1,
                       batch_size=32, train_subset=128, test_subset=50, out=str(tmp_path / "bp.pt")))
    tuned = load_model(bp["checkpoint"])
    assert all(isinstance(n, AdaptiveLIF) and n.adapt == 0.2 for n in tuned.neurons)
    assert not torch.equal(tuned.state_dict()["classifier.weight"], snn.state_dict()["classifier.weight"])

    eps = 8 / 255
    for gradient in ("alg1", "bptt"):
        r = run_attack(_cfg("attack", shared_data, source="snn-bp", source_ckpt=bp["checkpoint"], attack="mifgsm",
                            gradient=gradient, eps="8/255", alpha="2/255", steps=3, batch_size=16, test_subset=32,
                            out=str(tmp_path / f"attack-{gradient}.json")))
        assert r["attack"] == "mifgsm" and r["images"] == 32 and r["max_linf"] <= eps + 1e-6
        assert r["adv_acc"]["mean"] <= r["clean_acc"]["mean"]

    # the attack itself: inside the eps-ball and [0, 1], and it moves the images
    from snnadv.attacks import make_attack
    from snnadv.data import load_split, to_float

    test = load_split("cifar10", str(shared_data), train=False, subset=8)
    x, y = to_float(test.images), test.labels
    atk = make_attack("mifgsm", tuned, eps, alpha=2 / 255, steps=2)
    adv = atk(x, y)
    assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert (adv != x).any()

    ev = run_evaluate(_cfg("evaluate", shared_data, target_ckpt=bp["checkpoint"], suite="paper", paths="alg1,bptt",
                           eps="8/255", eot=1, eval_draws=1, steps=1, restarts=1, batch_size=16, test_subset=16,
                           library=False, out=str(tmp_path / "evaluate")))
    assert ev["rows"] and {row["path"] for row in ev["rows"] if row.get("path")} >= {"alg1"}


def _cli(*args, plugins: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if plugins:
        env["SNNADV_PLUGINS"] = "test_plugins"
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    else:
        env.pop("SNNADV_PLUGINS", None)
    return subprocess.run([sys.executable, "-m", "snnadv.cli.main", *args], capture_output=True, text=True,
                          env=env, timeout=timeout,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_plugin_neuron_and_attack_from_the_command_line(shared_data, tiny_ann, tmp_path):
    common = ["--data-dir", str(shared_data), "--device", "cpu", "--quiet"]
    # without the plugin: one line naming the choices, exit 2
    r = _cli("convert", "--checkpoint", str(tiny_ann), "--neuron", "alif", "--out", str(tmp_path / "x.pt"),
             *common, plugins=False)
    assert r.returncode == 2 and "alif" in r.stderr and "lif" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.pt").exists()

    help_text = _cli("attack", "--help").stdout
    assert "mifgsm" in help_text

    conv, bp = tmp_path / "conv.pt", tmp_path / "bp.pt"
    r = _cli("convert", "--checkpoint", str(tiny_ann), "--neuron", "alif", "--timesteps", "8", "--curve", "4,8",
             "--batch-size", "32", "--test-subset", "50", "--out", str(conv), *common)
    assert r.returncode == 0, r.stderr
    r = _cli("finetune", "--checkpoint", str(conv), "--timesteps", "8", "--epochs", "1", "--batch-size", "32",
             "--train-subset", "128", "--test-subset", "50", "--out", str(bp), *common)
    assert r.returncode == 0, r.stderr
    from snnadv.checkpoint import load_model

    assert load_model(bp).neuron == "alif"  # (registered here by this file's import)
    for gradient in ("alg1", "bptt"):
        out = tmp_path / f"attack-{gradient}.json"
        r = _cli("attack", "--source", "snn-bp", "--source-ckpt", str(bp), "--attack", "mifgsm", "--gradient",
                 gradient, "--steps", "2", "--batch-size", "16", "--test-subset", "16", "--out", str(out), *common)
        assert r.returncode == 0, r.stderr
        assert json.loads(out.read_text())["attack"] == "mifgsm"
    r = _cli("evaluate", "--target-ckpt", str(bp), "--suite", "paper", "--paths", "alg1,bptt", "--eot", "1",
             "--eval-draws", "1", "--steps", "1", "--restarts", "1", "--batch-size", "16", "--test-subset", "16",
             "--no-library", "--out", str(tmp_path / "evaluate"), *common)
    assert r.returncode == 0, r.stderr
