"""Attacks and gradient paths by name (snnadv.registry): a plugin attack or surrogate is
one decorator away from make_attack, make_gradient and the command line; the one PGD
loop equals the adaptive suite's former loop; every attack ends in the eps-ball."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import snnadv
from snnadv.attacks import PGD, Attack, make_attack, margins, project
from snnadv.attacks.suite import pgd_attack
from snnadv.errors import SnnadvError
from snnadv.gradients import make_gradient
from snnadv.models import ANN, SNN, get_spec
from snnadv.surrogates import Surrogate
from snnadv.registry import ATTACKS, GRADIENTS, SURROGATES

EPS = 8 / 255


def small_snn(seed=0, T=4):
    torch.manual_seed(seed)
    snn = SNN(get_spec("tiny", 10), num_steps=T, leak=0.95)
    snn.set_thresholds({n: 0.3 for n in snn.neuron_names})
    return snn.eval()


def small_ann(seed=1):
    torch.manual_seed(seed)
    return ANN(get_spec("tiny", 10)).eval()


def images(n=6, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.fixture
def toy_attack():
    """A plugin attack: a two-line subclass that steps out of the eps-ball (projected back)."""
    @snnadv.register_attack("toy-shift")
    class ToyShift(Attack):
        def forward(self, images, labels):
            return self.project(images + 3 * self.eps, images)

    yield ToyShift
    ATTACKS.unregister("toy-shift")


@pytest.fixture
def toy_surrogate():
    @snnadv.register_surrogate("toy-box")
    class ToyBox(Surrogate):
        name = "toy-box"

        def __init__(self, width: float = 0.5):
            self.width = float(width)

        def grad(self, mem, thr, dt):
            return ((mem - thr).abs() < self.width).to(mem.dtype)

    yield ToyBox
    SURROGATES.unregister("toy-box")


def test_registered_attack_is_made_by_name(toy_attack):
    model = small_ann()
    x, y = images()
    atk = make_attack("toy-shift", model, EPS, alpha=1 / 255, steps=3, random_start=True)
    assert isinstance(atk, toy_attack) and atk.eps == EPS
    adv = atk(x, y)
    assert torch.equal(adv, project(x + 3 * EPS, x, EPS))
    with pytest.raises(SnnadvError, match="did you mean 'toy-shift'"):
        make_attack("toy-shfit", model, EPS)


def test_registered_attack_on_the_command_line(toy_attack, tmp_path):
    from snnadv.cli.main import cli

    runner = CliRunner()
    for command in ("attack", "analyze perturbation"):
        assert "toy-shift" in runner.invoke(cli, [*command.split(), "--help"]).output
    bad = runner.invoke(cli, ["attack", "--attack", "toy-shfit"])
    assert bad.exit_code == 2 and "unknown attack 'toy-shfit'" in bad.output and "toy-shift" in bad.output
    ok = runner.invoke(cli, ["attack", "--attack", "toy-shift", "--source-ckpt", str(tmp_path / "missing.pt"),
                             "--out", str(tmp_path / "atk.json"), "--quiet"])  # parsed: fails on the checkpoint
    assert "Invalid value" not in ok.output
    assert isinstance(ok.exception, SnnadvError) and "missing.pt" in str(ok.exception)


def test_plugin_surrogate_gives_a_bptt_path(toy_surrogate):
    assert "bptt-toy-box" in GRADIENTS and list(GRADIENTS).index("bptt-toy-box") < list(GRADIENTS).index("rate")
    snn = small_snn()
    x, y = images(3)
    source = make_gradient(snn, "bptt-toy-box")
    assert source.name == "bptt-toy-box"
    snn.encoder.generator = torch.Generator().manual_seed(0)
    grad, _ = source(x, y)
    assert grad.shape == x.shape
    from snnadv.attacks.settings import resolve_paths

    assert "bptt-toy-box" in resolve_paths(snn, "all")
    from snnadv.cli.main import cli

    assert "bptt-toy-box" in CliRunner().invoke(cli, ["attack", "--help"]).output


def test_gone_plugin_surrogate_gives_no_path(toy_surrogate):
    SURROGATES.unregister("toy-box")
    assert "bptt-toy-box" not in GRADIENTS
    with pytest.raises(SnnadvError, match="unknown gradient path"):
        make_gradient(small_snn(), "bptt-toy-box")


@pytest.mark.parametrize("kind", ["ann", "snn"])
def test_every_attack_stays_in_the_eps_ball(kind, toy_attack):
    model = small_ann() if kind == "ann" else small_snn()
    x, y = images(4)
    x[0, 0, :4] = 0.0  # pixels at the bounds of [0, 1]
    x[1, 0, :4] = 1.0
    for name in ATTACKS:
        if ATTACKS[name].__module__.endswith("adapters"):
            pytest.importorskip("torchattacks")
        atk = make_attack(name, model, EPS, alpha=4 / 255, steps=3, random_start=True,
                          generator=torch.Generator().manual_seed(0))
        if kind == "snn":
            model.encoder.generator = torch.Generator().manual_seed(1)
        adv = atk(x, y)
        assert adv.shape == x.shape, name
        assert (adv - x).abs().max() <= EPS + 1e-6, name
        assert adv.min() >= 0.0 and adv.max() <= 1.0, name


# ----------------------------------------------------------------- the one PGD = the suite's former loop
def _reference_pgd(model, source, images, labels, eps, alpha, steps, restarts, batch_size, seed, select=None):
    """The adaptive suite's PGD as it was written before the one PGD loop (the reference twin),
    with the keyed randomness of ``craft(..., seed=)``: per batch, spikes keyed by the seed
    and the images' indices (each forward pass a new call), restarts from uniforms keyed
    by image and restart."""
    from snnadv.encoding import STREAM_START, encoder_keys, image_keys, keyed_uniform

    def run(x0, y, start, select):
        def proj(x):
            return torch.min(torch.max(x, x0 - eps), x0 + eps).clamp(0.0, 1.0)

        x = x0 if start is None else proj(x0 + eps * start)
        best, best_m = x0.clone(), torch.full((len(x0),), float("inf"))
        for t in range(steps + 1):
            if t < steps or select is None:
                grad, logits = source(x, y)
                m = margins(logits, y) if select is None else select(x, y)
            else:
                m = select(x, y)
            better = m < best_m
            best = torch.where(better[:, None, None, None], x, best)
            best_m = torch.where(better, m, best_m)
            if t < steps:
                x = proj(x + alpha * grad.sign())
        return best, best_m

    key = seed * 7919 + 104729
    out = []
    for i in range(0, len(images), batch_size):
        x0, y = images[i:i + batch_size], labels[i:i + batch_size]
        index = torch.arange(i, i + len(x0))
        with encoder_keys(model, key, index):
            best = best_m = None
            for r in range(restarts):
                start = None if r == 0 else \
                    keyed_uniform(image_keys(key, index, r, STREAM_START), x0.shape[1:])[0] * 2 - 1
                x, m = run(x0, y, start, select)
                if best is None:
                    best, best_m = x, m
                else:
                    better = m < best_m
                    best = torch.where(better[:, None, None, None], x, best)
                    best_m = torch.where(better, m, best_m)
            out.append(best)
    return torch.cat(out)


def test_one_pgd_equals_the_former_adaptive_loop():
    snn, ann = small_snn(), small_ann()
    x, y = images(6)
    got = pgd_attack(snn, make_gradient(snn, "alg1", 2), x, y, EPS, EPS / 4, 3, 3, 4, seed=1)
    ref = _reference_pgd(snn, make_gradient(snn, "alg1", 2), x, y, EPS, EPS / 4, 3, 3, 4, seed=1)
    assert torch.equal(got, ref)
    assert not torch.equal(got, x)
    # a proxy's gradient, the iterate chosen by the target's margin over fixed draws
    from snnadv.attacks.suite import _margin, _select_seeds

    seeds = _select_seeds(2, 2)
    got = pgd_attack(snn, make_gradient(snn, "ann", proxy=ann), x, y, EPS, EPS / 4, 2, 2, 4, seed=2, select_draws=2)
    ref = _reference_pgd(snn, make_gradient(snn, "ann", proxy=ann), x, y, EPS, EPS / 4, 2, 2, 4, seed=2,
                         select=lambda z, t: _margin(snn, z, t, seeds))
    assert torch.equal(got, ref)


def test_pgd_options():
    ann = small_ann()
    x, y = images(4)
    last = PGD(ann, EPS, EPS / 4, 3)(x, y)
    best = PGD(ann, EPS, EPS / 4, 3, keep_best=True)(x, y)
    with torch.no_grad():
        m = lambda z: margins(ann(z), y)  # noqa: E731
        assert (m(best) <= m(last) + 1e-6).all() and (m(best) <= m(x) + 1e-6).all()
    with pytest.raises(SnnadvError, match="keep_best"):
        PGD(ann, EPS, restarts=2)
    # targeted with the best iterate: towards the targets by the attack's own measure
    t = (y + 1) % 10
    adv = PGD(ann, 16 / 255, 2 / 255, 5, targeted=True, keep_best=True, restarts=2,
              generator=torch.Generator().manual_seed(0))(x, y, t)
    with torch.no_grad():
        assert (margins(ann(adv), t) >= margins(ann(x), t) - 1e-6).all()
