"""The memory estimator (snnadv.memory): measured saved bytes, the plan, attack pieces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from snnadv import doctor, memory
from snnadv.errors import SnnadvError
from snnadv.models import SNN, get_spec


def test_measured_bytes_per_image_step_predict_a_larger_run():
    """bytes = batch x (T x per_step + chunks x per_chunk): measured on one image at T=2
    and 4, it predicts what autograd saves at batch 3, T=9 in chunks of 3."""
    spec = get_spec("tiny", 10)
    prof = memory.measure(spec, "bptt")
    assert prof.per_step > 0 and prof.neurons > 0
    torch.manual_seed(0)
    snn = SNN(spec, num_steps=9, leak=0.99, chunk_steps=3)
    snn.set_thresholds({n: 0.3 for n in snn.neuron_names})
    snn.eval()
    x = torch.rand(3, 3, 32, 32, requires_grad=True)
    saved = memory._saved_bytes(snn, lambda: F.cross_entropy(snn(x), torch.zeros(3, dtype=torch.long)))
    predicted = 3 * (9 * prof.per_step + 3 * prof.per_chunk)
    assert abs(saved - predicted) <= 0.1 * saved, (saved, predicted)


def test_plan_splits_attacks_keeps_training_batches_and_refuses_with_an_estimate():
    prof = memory.measure(get_spec("tiny", 10), "alg1")
    whole = memory.peak_bytes(prof, 64, 500, memory.chunk_for(prof, 64, 500))
    fits = memory.plan(prof, 64, 500, 2 * whole)
    assert fits["batch"] == 64 and fits["pieces"] == 1 and fits["peak_bytes"] <= 2 * whole
    small = memory.peak_bytes(prof, 64, 500, 1) // 3  # not even chunks of one step fit batch 64
    split = memory.plan(prof, 64, 500, small)
    assert split["batch"] < 64 and split["pieces"] == -(-64 // split["batch"]) and split["peak_bytes"] <= small
    with pytest.raises(SnnadvError, match=r"needs about .* GiB"):
        memory.plan(prof, 64, 500, 1000)
    train = memory.measure(get_spec("tiny", 10), "snn-train")
    with pytest.raises(SnnadvError, match="training batch must stay whole"):
        memory.plan(train, 64, 500, memory.peak_bytes(train, 32, 500, 50))  # batch 32 would fit


def test_attack_takes_the_gradient_in_pieces_when_the_batch_does_not_fit(monkeypatch):
    """With little free memory the attack asks for the gradient in pieces; the loss is a
    sum, so on a deterministic input (binary images) the result is the same."""
    from snnadv.attacks import FGSM
    from snnadv.gradients import make_gradient

    torch.manual_seed(0)
    snn = SNN(get_spec("tiny", 10), num_steps=6, leak=0.95)
    snn.set_thresholds({n: 0.3 for n in snn.neuron_names})
    g = torch.Generator().manual_seed(0)
    x, y = (torch.rand(8, 3, 32, 32, generator=g) > 0.5).float(), torch.randint(0, 10, (8,), generator=g)
    calls = []
    source = make_gradient(snn, "alg1")
    attack = FGSM(snn, 8 / 255, gradient=lambda a, b: (calls.append(len(a)), source(a, b))[1])
    whole = attack(x, y)
    assert calls == [8]
    prof = memory._profile(snn.spec, "alg1", "fp32")
    monkeypatch.setattr(memory, "free_bytes", lambda device: memory.peak_bytes(prof, 3, 6, 6))
    calls.clear()
    pieces = attack(x, y)
    assert len(calls) > 1 and sum(calls) == 8 and max(calls) <= 3
    assert torch.equal(whole, pieces)


def test_every_stage_of_the_vgg5_paper_config_fits_80_gib():
    """The issue's target, by this estimator (the table in the report has all configs)."""
    rows = doctor.paper_plan(80 * memory.GiB, configs=("vgg5_cifar10",))
    assert len(rows) == len(doctor.PAPER_STAGES)
    assert all("error" not in r and r["peak_bytes"] <= 80 * memory.GiB for r in rows), rows
    assert "| vgg5_cifar10 | table: attack SNN-conv, alg1 | 2500 | 64 |" in doctor.format_plan(rows, 80 * memory.GiB)
