"""The package's APGD (snnadv.attacks.apgd) against its reference twin, torchattacks' APGD,
and its per-sample early exit.  Tiny models, a few seconds each on a CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from snnadv.attacks import make_attack
from snnadv.attacks.apgd import APGD, APGDDLR, checkpoints, dlr_loss
from snnadv.estimator import EstimatorModule
from snnadv.models import SNN, get_spec

torchattacks = pytest.importorskip("torchattacks")
EPS = 16 / 255  # the toy net (random weights) is fooled on some images and not others at this budget


def small_ann(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                         nn.Linear(128, 10)).eval()


def correct_batch(model, n=24, seed=1):
    """``n`` random images labelled with the model's own predictions (all correct at the start)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 16, 16, generator=g)
    with torch.no_grad():
        return x, model(x).argmax(1)


@pytest.mark.parametrize("cls,loss", [(APGD, "ce"), (APGDDLR, "dlr")])
@pytest.mark.parametrize("steps", [10, 25])
def test_one_run_equals_torchattacks(cls, loss, steps):
    """Algorithm 1 step for step: the same best points, best losses, fooled images and
    fooled iterates as torchattacks' ``attack_single_run`` from the same random numbers."""
    model = small_ann()
    x, y = correct_batch(model)
    ref = torchattacks.APGD(model, norm="Linf", eps=EPS, steps=steps, loss=loss)
    torch.manual_seed(3)
    r_best, r_acc, r_loss, r_adv = ref.attack_single_run(x, y)
    ours = cls(model, EPS, steps=steps)
    torch.manual_seed(3)
    best, hit, loss_best, adv = ours.run(x, y)
    assert torch.equal(hit, ~r_acc.bool())
    assert 0 < int(hit.sum()) < len(x)  # a test that can tell: some fooled, some not
    torch.testing.assert_close(best, r_best, rtol=0, atol=1e-6)
    torch.testing.assert_close(loss_best, r_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(adv[hit], r_adv[hit], rtol=0, atol=1e-6)


def test_whole_attack_equals_torchattacks_on_the_fooled_images():
    """Through ``make_attack`` with 2 restarts: the same images fooled, with the same
    adversarial images; an image torchattacks leaves clean is our highest-loss iterate."""
    model = small_ann()
    x, y = correct_batch(model)
    ref = make_attack("apgd-ce-torchattacks", model, EPS, steps=12, restarts=2, seed=5)(x, y)
    ours = make_attack("apgd-ce", model, EPS, steps=12, restarts=2, seed=5)(x, y)
    with torch.no_grad():
        fooled_ref, fooled = model(ref).argmax(1) != y, model(ours).argmax(1) != y
    assert torch.equal(fooled, fooled_ref) and fooled.any() and not fooled.all()
    torch.testing.assert_close(ours[fooled], ref[fooled], rtol=0, atol=1e-6)
    assert torch.equal(ref[~fooled], x[~fooled]) and not torch.equal(ours[~fooled], x[~fooled])
    assert (ours - x).abs().max() <= EPS + 1e-6 and ours.min() >= 0 and ours.max() <= 1


def test_through_an_estimator_module_equals_torchattacks():
    """An SNN through its estimator module (stochastic spikes): without early exit our
    APGD draws the same random numbers as torchattacks', so the results are equal."""
    torch.manual_seed(0)
    snn = SNN(get_spec("tiny", 10), num_steps=4, leak=0.95).eval()
    snn.set_thresholds({n: 0.3 for n in snn.neuron_names})
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, 32, 32, generator=g)
    target = EstimatorModule(snn, "bptt-fast-sigmoid", eot=2)
    with torch.no_grad():
        y = target(x).argmax(1)  # correct at the start (for one draw)
    torch.manual_seed(9)
    ref = make_attack("apgd-ce-torchattacks", target, EPS, steps=4, seed=2)(x, y)
    torch.manual_seed(9)
    ours = make_attack("apgd-ce", target, EPS, steps=4, seed=2)(x, y)
    moved = (ref != x).flatten(1).any(1)  # the images torchattacks reports fooled
    assert moved.any()
    torch.testing.assert_close(ours[moved], ref[moved], rtol=0, atol=1e-6)


def test_early_exit_keeps_every_result_and_computes_less():
    """A deterministic model: with the early exit the same images are fooled (each by an
    iterate that fools it), the others get bit-identical best points, and far fewer
    image-steps are computed."""
    model = small_ann()
    x, y = correct_batch(model, n=32)
    plain, fast = APGD(model, EPS, steps=30), APGD(model, EPS, steps=30, early_exit=True)
    torch.manual_seed(4)
    best, hit, loss, _ = plain.run(x, y)
    torch.manual_seed(4)
    best_f, hit_f, loss_f, adv_f = fast.run(x, y)
    assert torch.equal(hit_f, hit) and hit.any() and not hit.all()
    with torch.no_grad():
        assert (model(adv_f[hit_f]).argmax(1) != y[hit_f]).all()
    assert torch.equal(best_f[~hit], best[~hit]) and torch.equal(loss_f[~hit], loss[~hit])
    assert plain.image_steps == 31 * len(x)
    assert fast.image_steps < 0.8 * plain.image_steps, (fast.image_steps, plain.image_steps)
    out = fast(x, y)
    assert (out - x).abs().max() <= EPS + 1e-6


def test_dlr_and_checkpoints():
    z = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 5.0, 1.0, 2.0]])
    y = torch.tensor([0, 0])
    # image 0: correct, margin 2 over (3 - 0); image 1: wrong, margin -5 over (5 - 1)
    torch.testing.assert_close(dlr_loss(z, y), torch.tensor([-2 / 3, 5 / 4]))
    assert checkpoints(100) == (22, 6, 3) and checkpoints(5) == (1, 1, 1)


def test_confirmed_exit_on_an_snn_leaves_only_images_fooled_on_every_evaluation_draw():
    """On an SNN through its estimator, an image leaves early only with an iterate that
    the K keyed evaluation draws (the ones the cascade scores it with) all misclassify;
    the images left are attacked on; fewer image-steps than without the exit."""
    from snnadv.attacks.apgd import FooledOnEveryDraw
    from snnadv.attacks.cascade import craft_at, keyed_correct

    torch.manual_seed(0)
    snn = SNN(get_spec("tiny", 10), num_steps=4, leak=0.95).eval()
    snn.set_thresholds({n: 0.3 for n in snn.neuron_names})
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 3, 32, 32, generator=g)
    index = torch.arange(100, 108)  # global indices: the keyed draws depend on them
    K, seed = 3, 7
    with torch.no_grad():
        y = EstimatorModule(snn, "bptt-fast-sigmoid")(x).argmax(1)
    target = EstimatorModule(snn, "bptt-fast-sigmoid", eot=2)
    plain = APGD(target, 32 / 255, steps=8)
    fast = APGD(target, 32 / 255, steps=8, early_exit=True, confirm=FooledOnEveryDraw(snn, K, seed))
    craft_at(plain, x, y, index, 8, seed)
    out = craft_at(fast, x, y, index, 8, seed)
    wrong_everywhere = ~keyed_correct(snn, out, y, index, K, seed).any(0)
    assert wrong_everywhere.any()  # some images fooled on every draw ...
    assert fast.image_steps < plain.image_steps  # ... and they left early
    _, hit, _, adv = fast.run(x, y, index)  # every image that left: fooled on every evaluation draw
    assert hit.any() and not keyed_correct(snn, adv[hit], y[hit], index[hit], K, seed).any()
    with pytest.raises(Exception, match="global indices"):
        fast(x, y)  # not through craft: no indices to key the evaluation draws


def test_confirm_needs_early_exit():
    with pytest.raises(Exception, match="early_exit"):
        APGD(small_ann(), EPS, confirm=lambda *a: None)
