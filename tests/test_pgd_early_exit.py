"""PGD's per-sample early exit (``early_exit``, :mod:`snnadv.attacks.pgd`).

A tiny keyed SNN (T = 6) whose readout leans towards class 0, so that with labels 0
most images start correct with margins from small to large, and every fourth image
carries another label (wrong from the start): under PGD some images fall at once,
some at a later step or restart, and some never.  With early exit the images that
fall are the same, those that never fall get the very same iterates and margins, and
the attack computes fewer image-passes.
"""

from __future__ import annotations

import pytest
import torch

from snnadv.attacks import PGD, craft, make_attack
from snnadv.attacks.base import Attack
from snnadv.attacks.suite import _margin
from snnadv.eot import BatchedEOT
from snnadv.errors import SnnadvError
from snnadv.gradients import make_gradient
from snnadv.models import SNN, get_spec

N = 16
EPS = 8 / 255
INDEX = torch.arange(100, 100 + N)  # global indices (not 0..N-1)


def leaning_snn():
    torch.manual_seed(0)
    snn = SNN(get_spec("tiny", 10), num_steps=6, leak=0.95)
    snn.set_thresholds({n: 0.3 for n in snn.neuron_names})
    with torch.no_grad():
        snn.classifier.weight[0] += 0.05  # class 0's logit grows with the hidden layer's activity
    return snn.eval()


def data():
    """Images of rising brightness (so rising class-0 margins); labels 0, every fourth another class."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(N, 3, 32, 32, generator=g) * torch.linspace(0.3, 1.0, N).view(-1, 1, 1, 1)
    y = torch.zeros(N, dtype=torch.long)
    y[::4] = 1 + torch.arange(N // 4)
    return x, y


class BatchSizes:
    """The batch size of every forward pass of the model (a forward pre-hook)."""

    def __init__(self, model):
        self.sizes = []
        self.handle = model.register_forward_pre_hook(lambda m, args: self.sizes.append(len(args[0])))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def attack(snn, early: bool, variant: str = "logits") -> PGD:
    """PGD-6 x2 restarts, random start, keep_best; ``plain``: alg1 with one draw per step."""
    src = make_gradient(snn, "alg1")
    kw = {}
    if variant == "logits":  # the margin of the EOT mean of two batched draws
        src = BatchedEOT(src, 2, snn)
    elif variant == "select":  # the adaptive suite's proxy case: the margin on fixed keyed draws
        kw["select"] = lambda a, b: _margin(snn, a, b, [3, 4])
    elif variant == "targeted":
        kw["targeted"] = True
    return PGD(snn, EPS, EPS / 4, 6, random_start=True, gradient=src, restarts=2, keep_best=True,
               early_exit=early, **kw)


def search(atk, x, y, targets=None, seed=7):
    with atk.keyed(seed, INDEX):
        return atk.search(x, y, targets)


@pytest.mark.parametrize("variant", ["logits", "select", "targeted", "pieces"])
def test_early_exit_same_adversarial_set_and_the_others_bit_for_bit(variant, monkeypatch):
    if variant == "pieces":  # the gradient in pieces of 3 images (each piece keyed as in the whole batch)
        monkeypatch.setattr(Attack, "piece_size", lambda self, x: 3)
    snn = leaning_snn()
    x, y = data()
    targets = (y + 1) % 10 if variant == "targeted" else None
    with BatchSizes(snn) as full:
        xa, ma = search(attack(snn, False, variant), x, y, targets)
    with BatchSizes(snn) as early:
        xb, mb = search(attack(snn, True, variant), x, y, targets)
    fell = ma < 0
    assert torch.equal(fell, mb < 0)
    assert 2 <= int(fell.sum()) <= N - 2, fell  # some fell, at least two never did
    assert torch.equal(xa[~fell], xb[~fell])  # the iterates bit for bit
    if variant == "pieces":  # pieces of one image: PyTorch's CPU kernels round a batch of one differently
        torch.testing.assert_close(ma[~fell], mb[~fell], rtol=0, atol=1e-6)
    else:
        assert torch.equal(ma[~fell], mb[~fell])
    # an image that fell returns an adversarial iterate in the ball (its first: no lower margin than the best)
    assert (mb[fell] >= ma[fell]).all()
    d = (xb - x).abs().amax()
    assert 0 < d <= EPS + 1e-6 and xb.min() >= 0 and xb.max() <= 1
    assert sum(early.sizes) < sum(full.sizes)


def test_early_exit_computes_fewer_image_passes_and_is_batch_independent():
    snn = leaning_snn()
    x, y = data()
    with BatchSizes(snn) as full:
        xa = search(attack(snn, False, "plain"), x, y)[0]
    with BatchSizes(snn) as early:
        xb, mb = search(attack(snn, True, "plain"), x, y)
    # without early exit: 2 restarts x (6 steps + the last iterate's margin) passes over all 16 images
    assert full.sizes == [N] * 14
    # with it: the first pass on all 16, then only the images still standing, never more
    assert early.sizes[0] == N and early.sizes[1] == N - 4  # the 4 wrongly labelled leave at once
    assert all(a >= b for a, b in zip(early.sizes, early.sizes[1:]))
    assert sum(early.sizes) < 0.6 * sum(full.sizes), (early.sizes, sum(full.sizes))
    assert not torch.equal(xa, xb)  # the fallen stopped at their first adversarial iterate
    # keyed: the same images whatever the batches (craft: batches of 6 of the global indices 0..15)
    atk = attack(snn, True, "plain")
    with atk.keyed(7, torch.arange(N)):
        whole = atk(x, y)
    assert torch.equal(craft(atk, x, y, 6, seed=7), whole)


def test_early_exit_needs_keep_best():
    snn = leaning_snn()
    with pytest.raises(SnnadvError, match="keep_best=True"):
        PGD(snn, EPS, EPS / 4, 3, early_exit=True)
    with pytest.raises(SnnadvError, match="keep_best=True"):
        make_attack("pgd", snn, EPS, EPS / 4, 3, early_exit=True)
    PGD(snn, EPS, EPS / 4, 3, keep_best=True, early_exit=True)  # accepted
