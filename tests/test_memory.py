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


# ----------------------------------------------------------------- the plan on a CPU
G = memory.GiB


def test_free_bytes_on_a_cpu_is_available_memory_plus_the_free_heap_capped_by_the_limit(monkeypatch):
    """0.9 x MemAvailable + the heap's free bytes up to the largest pass already granted;
    ``SNNADV_MEMORY_LIMIT`` caps it at the limit less what this process holds live; a bad
    limit is one clear error."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(memory, "_available_bytes", lambda: 10 * G)
    monkeypatch.setattr(memory, "heap_free_bytes", lambda: 1 * G)
    monkeypatch.setattr(memory, "_rss_bytes", lambda: 3 * G)
    monkeypatch.setattr(memory, "_GRANTED", {})
    monkeypatch.delenv("SNNADV_MEMORY_LIMIT", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert memory.free_bytes(cpu) == int(0.9 * 10 * G)        # holes left by other work do not count
    memory.grant("cpu", G // 2)
    assert memory.free_bytes(cpu) == int(0.9 * 10 * G) + G // 2
    memory.grant("cuda", 5 * G)
    memory.grant("cpu", 3 * G)                                # a pass as large as the holes: all count
    assert memory.free_bytes(cpu) == int(0.9 * 10 * G) + G
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")               # four torchrun ranks share the machine
    assert memory.free_bytes(cpu) == int(0.9 * 10 * G / 4) + G
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("SNNADV_MEMORY_LIMIT", "4")
    assert memory.free_bytes(cpu) == 4 * G - (3 * G - G)      # 2 GiB live: 2 GiB left under 4
    monkeypatch.setenv("SNNADV_MEMORY_LIMIT", "1.5")
    assert memory.free_bytes(cpu) == 0
    for bad in ("x", "0", "-2", "nan", "inf"):
        monkeypatch.setenv("SNNADV_MEMORY_LIMIT", bad)
        with pytest.raises(SnnadvError, match="SNNADV_MEMORY_LIMIT"):
            memory.free_bytes(cpu)
    monkeypatch.setattr(memory, "_available_bytes", lambda: None)  # unknown: no plan without a limit
    monkeypatch.delenv("SNNADV_MEMORY_LIMIT")
    assert memory.free_bytes(cpu) is None
    monkeypatch.setenv("SNNADV_MEMORY_LIMIT", "4")
    assert memory.free_bytes(cpu) == 1 * G                    # 4 GiB less the 3 GiB resident


def test_the_free_heap_counts_memory_freed_inside_the_heap():
    """Chunks freed between live ones stay in glibc's heap: ``heap_free_bytes`` sees them."""
    import ctypes

    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("not glibc >= 2.33")
    blocks = [bytearray(64 * 1024) for _ in range(400)]       # below glibc's mmap threshold
    before = memory.heap_free_bytes()
    del blocks[::2]                                           # 200 holes of 64 KiB
    assert memory.heap_free_bytes() - before >= 100 * 64 * 1024
    del blocks


def test_on_a_cpu_that_keeps_freed_memory_the_plan_counts_the_heaps_fragmentation(monkeypatch):
    from snnadv import runtime

    prof = memory.measure(get_spec("tiny", 10), "alg1")
    monkeypatch.setattr(runtime, "_applied", True)
    assert memory.allocator_factor("cpu") == memory.CPU_HEAP_FACTOR > 1
    assert memory.allocator_factor("cuda") == 1.0
    peak = memory.peak_bytes(prof, 8, 16, 16)
    assert memory.plan(prof, 8, 16, 10 ** 12, "cpu")["peak_bytes"] == int(memory.CPU_HEAP_FACTOR * peak)
    on_cpu, on_cuda = memory.plan(prof, 8, 16, peak, "cpu"), memory.plan(prof, 8, 16, peak, "cuda")
    assert on_cuda == {"batch": 8, "pieces": 1, "chunk": 16, "peak_bytes": peak}
    assert on_cpu["peak_bytes"] <= peak and (on_cpu["batch"], on_cpu["chunk"]) < (8, 16)  # smaller pieces
    monkeypatch.setattr(runtime, "_applied", False)
    assert memory.allocator_factor("cpu") == 1.0


def _estimator(eot=4):
    from snnadv.estimator import EstimatorModule

    torch.manual_seed(0)
    snn = SNN(get_spec("tiny", 10), num_steps=6, leak=0.95).eval()
    snn.set_thresholds({n: 0.3 for n in snn.neuron_names})
    return snn, EstimatorModule(snn, "alg1", eot=eot, batched=True, generator=torch.Generator().manual_seed(1))


def _input_grad(est, x, y):
    x = x.clone().requires_grad_(True)
    F.cross_entropy(est(x), y).backward()
    return x.grad


def test_a_batched_eot_gradient_that_does_not_fit_is_refused_with_a_batch_that_does(monkeypatch):
    """The estimator's batched EOT draws all copies from one seed, so it is not split: a
    batch whose pass would not fit is refused, naming the estimate and the largest batch
    that fits; that batch runs.  With room, the check changes nothing (same gradient)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    snn, est = _estimator()
    monkeypatch.setattr(memory, "free_bytes", lambda device: None)
    free = _input_grad(est, x, y)
    snn, est = _estimator()
    monkeypatch.setattr(memory, "free_bytes", lambda device: 10 ** 12)
    monkeypatch.setattr(memory, "_GRANTED", {})
    assert torch.equal(_input_grad(est, x, y), free)
    prof = memory._profile(snn.spec, "alg1", "fp32")  # the pass is granted: its holes count next time
    assert memory._GRANTED["cpu"] == int(memory.allocator_factor("cpu") * memory.peak_bytes(prof, 32, 6, 6))

    budget = memory.peak_bytes(prof, 3 * 4, 6, memory.chunk_for(prof, 3 * 4, 6, "cpu")) \
        * memory.allocator_factor("cpu")
    monkeypatch.setattr(memory, "free_bytes", lambda device: int(budget) + 1)
    snn, est = _estimator()
    with pytest.raises(SnnadvError, match=r"8 images x 4 EOT copies at T=6 need about .* GiB, .* --batch-size 3 fits"):
        _input_grad(est, x, y)
    _input_grad(est, x[:3], y[:3])
    monkeypatch.setattr(memory, "free_bytes", lambda device: 1000)
    _, est = _estimator()
    with pytest.raises(SnnadvError, match="not even one image fits"):
        _input_grad(est, x[:1], y[:1])


def test_an_attacks_pieces_count_its_batched_eot_copies(monkeypatch):
    from snnadv.attacks import FGSM
    from snnadv.eot import BatchedEOT
    from snnadv.gradients import make_gradient

    snn, _ = _estimator()
    prof = memory._profile(snn.spec, "alg1", "fp32")
    monkeypatch.setattr(memory, "free_bytes", lambda device: memory.plan(prof, 4, 6, 10 ** 12, "cpu")["peak_bytes"])
    x = torch.rand(8, 3, 32, 32)
    assert FGSM(snn, 8 / 255, gradient=make_gradient(snn, "alg1")).piece_size(x) == 4
    assert FGSM(snn, 8 / 255, gradient=BatchedEOT(make_gradient(snn, "alg1"), 2, snn)).piece_size(x) == 2


def test_a_training_batch_that_does_not_fit_is_refused_saying_it_is_not_split(monkeypatch):
    from snnadv.training import _require_memory

    snn, _ = _estimator()
    snn.train()
    prof = memory._profile(snn.spec, "snn-train", "fp32")
    budget = memory.allocator_factor("cpu") * memory.peak_bytes(prof, 4, 6, memory.chunk_for(prof, 4, 6, "cpu"))
    monkeypatch.setattr(memory, "free_bytes", lambda device: int(budget) + 1)
    assert _require_memory(snn, 4)
    with pytest.raises(SnnadvError, match=r"fine-tuning: 16 images at T=6 need .* a training batch is not split: "
                                          r"--batch-size 4 fits"):
        _require_memory(snn, 16)


def test_a_sharpness_search_that_does_not_fit_is_refused_naming_the_held_out_images_that_do(monkeypatch):
    """The search's FGSM gradients run on the whole held-out batch under fixed draws (not
    split): too many images are refused before any work with the ``--sharpness-images``
    that fits; the protocol setting overrides the preset's 32, and that many then run."""
    from snnadv.attacks import protocols
    from snnadv.attacks.run_protocol import protocol_attacks
    from snnadv.sharpness import search_sharpness

    snn, _ = _estimator()
    g = torch.Generator().manual_seed(0)
    hx, hy = torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    prof = memory._profile(snn.spec, "bptt", "fp32")
    budget = memory.allocator_factor("cpu") * memory.peak_bytes(prof, 3, 6, memory.chunk_for(prof, 3, 6, "cpu"))
    monkeypatch.setattr(memory, "free_bytes", lambda device: int(budget) + 1)
    searched = []
    monkeypatch.setattr("snnadv.sharpness.search_sharpness",
                        lambda *a, **k: searched.append(len(a[1])) or search_sharpness(*a, **k))
    strong = protocols.resolve_protocol("strong-cpu", {"attacks": "fgsm"})
    assert strong.sharpness_images == 32
    with pytest.raises(SnnadvError, match=r"sharpness search \(bptt-fast-sigmoid\): 8 images at T=6 need about "
                                          r".* GiB, .* --sharpness-images 3 fits"):
        protocol_attacks(snn, strong, heldout=(hx, hy))
    assert searched == []  # refused before the search began
    p = protocols.resolve_protocol("strong-cpu", {"attacks": "fgsm", "sharpness_images": 3})
    p = protocols.Protocol(**{**p.__dict__, "sharpness_iters": 1})
    out = protocol_attacks(snn, p, heldout=(hx, hy))
    assert searched == [3] and out["sharpness"]["images"] == 3
    with pytest.raises(SnnadvError, match=r"'sharpness_iters' cannot be overridden \(choose .*sharpness_images\)"):
        protocols.resolve_protocol("strong-cpu", {"sharpness_iters": 3})
