"""Input encoding (paper Sec. 2.2): rate coding, b-bit pre-quantisation, the signed
mode of the original code, explicit generators, keyed spikes and the straight-through
gradient."""

from __future__ import annotations

import pytest
import torch
from snntorch import spikegen

from snnadv.encoding import (RateEncoder, check_bits, current_keys, encoder_keys, encoder_seed, image_keys,
                             keyed_uniform, mix32, normalize, quantize, rate)
from snnadv.errors import SnnadvError
from snnadv.models import ANN, SNN, get_spec


def _x(shape=(4, 3, 8, 8), seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_spikes_are_binary_frames_of_the_right_shape():
    x = _x()
    s = RateEncoder()(x, 7)
    assert s.shape == (7, *x.shape)
    assert set(s.unique().tolist()) <= {0.0, 1.0}


def test_time_average_converges_to_the_image():
    x = _x()
    torch.manual_seed(0)
    errors = {T: (RateEncoder()(x, T).mean(0) - x).abs().mean().item() for T in (10, 100, 1000)}
    assert errors[1000] < 0.02
    assert errors[1000] < errors[100] < errors[10]
    # the extremes are exact: 0 never fires, 1 always fires
    edge = torch.tensor([0.0, 1.0])
    s = RateEncoder()(edge, 50)
    assert s[:, 0].sum() == 0 and s[:, 1].sum() == 50


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_quantize_gives_2_to_the_b_levels(bits):
    x = torch.linspace(0, 1, 1001)
    q = quantize(x, bits)
    levels = q.unique()
    assert len(levels) == 2 ** bits
    torch.testing.assert_close(levels, torch.arange(2 ** bits) / (2 ** bits - 1))
    assert (q - x).abs().max() <= 0.5 / (2 ** bits - 1) + 1e-6  # rounding to the nearest level


def test_quantize_none_is_identity_and_clamps_out_of_range():
    x = torch.tensor([-0.2, 0.3, 1.4])
    assert quantize(x, None) is x
    assert quantize(x, 2).tolist() == pytest.approx([0.0, 1 / 3, 1.0])


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_encoder_average_converges_to_the_quantised_image(bits):
    x = _x((2, 3, 8, 8), seed=1)
    torch.manual_seed(1)
    avg = RateEncoder(bits=bits)(x, 2000).mean(0)
    q = quantize(x, bits)
    assert (avg - q).abs().mean() < 0.015
    # ... and not to the raw image (the quantisation error is visible)
    assert (avg - x).abs().mean() > (avg - q).abs().mean()


def test_signed_mode_ternary_spikes_average_2x_minus_1():
    x = _x((2, 3, 8, 8), seed=2)
    torch.manual_seed(2)
    s = RateEncoder(input_range="signed")(x, 2000)
    assert set(s.unique().tolist()) == {-1.0, 0.0, 1.0}
    assert (s.mean(0) - (2 * x - 1)).abs().mean() < 0.02
    # a pixel's spikes all carry the sign of 2x - 1
    assert ((s * torch.sign(2 * x - 1)) >= 0).all()
    assert torch.equal(normalize(x, "signed"), 2 * x - 1) and normalize(x, "unit") is x


def test_gain_scales_the_rate():
    x = torch.full((1000,), 0.8)
    torch.manual_seed(3)
    avg = RateEncoder(gain=0.5)(x, 200).mean()
    assert avg.item() == pytest.approx(0.4, abs=0.01)


def test_generator_fixes_the_spikes_and_leaves_the_global_rng_alone():
    x = _x()

    def draw(seed):
        return RateEncoder(generator=torch.Generator().manual_seed(seed))(x, 20)

    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b, c = draw(1), draw(1), draw(2)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # the global RNG does not influence the generator path
    torch.manual_seed(999)
    assert torch.equal(draw(1), a)
    # a generator advances: two calls with one generator differ
    enc = RateEncoder(generator=torch.Generator().manual_seed(1))
    assert torch.equal(enc(x, 20), a) and not torch.equal(enc(x, 20), a)


def test_without_generator_equals_snntorch_rate():
    x = _x()
    torch.manual_seed(42)
    ours = RateEncoder()(x, 25)
    torch.manual_seed(42)
    theirs = spikegen.rate(x, num_steps=25)
    assert torch.equal(ours, theirs)
    torch.manual_seed(42)
    assert torch.equal(rate(x, 25), theirs)


@pytest.mark.parametrize("mode", ["unit", "bits"])
def test_straight_through_gradient(mode):
    T = 9
    x = _x((2, 3, 4, 4)).requires_grad_(True)
    enc = RateEncoder(bits=4 if mode == "bits" else None)
    s = enc(x, T)
    assert set(s.detach().unique().tolist()) <= {0.0, 1.0}  # the values stay the sampled spikes
    s.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, float(T)))


def test_straight_through_gradient_signed_mode():
    T = 5
    x = torch.tensor([0.1, 0.3, 0.7, 0.9], requires_grad=True)
    RateEncoder(input_range="signed")(x, T).sum().backward()
    # d/dx [sign(2x-1) * rate(|2x-1|)] = sign^2 * 2 per frame
    assert torch.equal(x.grad, torch.full_like(x, 2.0 * T))


@pytest.mark.parametrize("bits", [0, 9, -1, 16, 2.0, "4"])
def test_bits_outside_1_to_8_are_errors(bits):
    with pytest.raises(SnnadvError):
        check_bits(bits)
    with pytest.raises(SnnadvError):
        RateEncoder(bits=bits)
    with pytest.raises(SnnadvError):
        ANN(get_spec("tiny", 10), input_bits=bits)
    with pytest.raises(SnnadvError):
        SNN(get_spec("tiny", 10), input_bits=bits)


def test_unknown_input_range_is_an_error():
    with pytest.raises(SnnadvError):
        RateEncoder(input_range="bipolar")


def test_ann_quantises_its_input_like_the_snn_encoder():
    """An ANN with input_bits sees the quantised image (the SNN's encoder rate)."""
    torch.manual_seed(0)
    spec = get_spec("tiny", 10)
    ann4, ann = ANN(spec, input_bits=4).eval(), ANN(spec).eval()
    ann.load_state_dict(ann4.state_dict())
    x = _x((2, 3, 32, 32))
    with torch.no_grad():
        assert torch.equal(ann4(x), ann(quantize(x, 4)))
        assert not torch.equal(ann4(x), ann(x))


# --------------------------------------------------------------------------- keyed spikes
def test_mix32_is_lowbias32_in_int64_without_overflow():
    import random

    rng = random.Random(0)
    values = [0, 1, 2**31, 2**32 - 1] + [rng.getrandbits(32) for _ in range(500)]

    def reference(h):  # plain Python integers, wrapped to 32 bits
        h ^= h >> 16
        h = (h * 0x21F0AAAD) & 0xFFFFFFFF
        h ^= h >> 15
        h = (h * 0x735A2D97) & 0xFFFFFFFF
        return h ^ (h >> 15)

    t = torch.tensor(values, dtype=torch.int64)
    assert mix32(t).tolist() == [reference(v) for v in values] == [mix32(v) for v in values]
    assert len(set(mix32(t).tolist())) == len(set(values))  # a bijection


@pytest.mark.parametrize("input_range", ["unit", "signed"])
def test_keyed_spikes_depend_on_the_image_index_not_on_batching_or_chunks(input_range):
    x = _x((7, 3, 5, 5))
    enc = RateEncoder(input_range=input_range)
    with encoder_keys(enc, 3, torch.arange(100, 107)) as keys:
        whole = enc(x, 8)
        again = enc(x, 8)  # the next call on the batch: fresh spikes
        assert keys.calls == 2
    # the same images in other batches, in time chunks of other sizes: the same frames, call by call
    for parts, chunks in (([0, 2, 7], [3, 5]), ([0, 1, 4, 7], [1, 1, 6]), ([0, 7], [8])):
        frames = [[], []]
        for lo, hi in zip(parts, parts[1:]):
            with encoder_keys(enc, 3, torch.arange(100 + lo, 100 + hi)):
                for call in range(2):
                    t0, got = 0, []
                    for n in chunks:
                        got.append(enc(x[lo:hi], n, t0))
                        t0 += n
                    frames[call].append(torch.cat(got))
        assert torch.equal(torch.cat(frames[0], 1), whole)
        assert torch.equal(torch.cat(frames[1], 1), again)
    assert not torch.equal(whole, again)
    with encoder_keys(enc, 4, torch.arange(100, 107)):  # another seed
        assert not torch.equal(enc(x, 8), whole)
    with encoder_keys(enc, 3, torch.arange(200, 207)):  # other indices
        assert not torch.equal(enc(x, 8), whole)
    # the same image at another batch position keeps its spikes
    with encoder_keys(enc, 3, torch.tensor([106, 100])):
        swapped = enc(x[[6, 0]], 8)
    assert torch.equal(swapped, whole[:, [6, 0]])
    assert enc.keys is None  # the generator mode is back


def test_keyed_spike_rate_matches_the_probability():
    p = torch.tensor([0.0, 0.05, 0.3, 0.5, 0.77, 1.0]).view(1, 6, 1, 1).expand(3, 6, 4, 4).contiguous()
    enc = RateEncoder()
    with encoder_keys(enc, 0, torch.arange(3)):
        s = enc(p, 2000)
    assert set(s.unique().tolist()) <= {0.0, 1.0}
    rate_ = s.mean((0, 1, 3, 4))  # 2000 steps x 48 pixels per level
    assert torch.allclose(rate_, p[0, :, 0, 0], atol=0.005)
    assert rate_[0] == 0 and rate_[-1] == 1
    # the integer comparison of the encoder is u < p with the uniforms of keyed_uniform
    u = keyed_uniform(image_keys(0, torch.arange(3), 0), p.shape[1:], 2000)
    assert torch.equal(s, (u < p).float())
    # pixels and timesteps are not correlated: neighbours agree as often as chance says
    a, b = s[:, :, 2, 0, 0], s[:, :, 2, 0, 1]
    assert abs(float((a * b).mean()) - 0.09) < 0.01
    assert abs(float((s[1:, :, 2] * s[:-1, :, 2]).mean()) - 0.09) < 0.005


def test_keyed_spikes_have_the_straight_through_gradient():
    x = _x((2, 3, 4, 4)).requires_grad_(True)
    enc = RateEncoder(bits=4)
    with encoder_keys(enc, 1, torch.arange(2)):
        s = enc(x, 9)
    s.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 9.0))


def test_keyed_blocks_nest_and_a_generator_block_inside_wins():
    x = _x((3, 3, 4, 4))
    snn = SNN(get_spec("tiny", 10), num_steps=4)
    enc = snn.encoder
    with encoder_keys(snn, 5, torch.arange(3)) as outer:
        first = enc(x, 4)
        with encoder_keys(snn, 9) as inner:  # the enclosing index, its own seed and count
            assert torch.equal(inner.index, outer.index) and current_keys(snn) is inner
            fixed = enc(x, 4)
        with encoder_keys(snn, 9):
            assert torch.equal(enc(x, 4), fixed)  # a fixed draw: the same in every block
        with encoder_seed(snn, 1):
            assert current_keys(snn) is None and enc.generator is not None
        assert current_keys(snn) is outer and outer.calls == 1
        with pytest.raises(SnnadvError, match="image indices"):
            enc(x[:2], 4)  # a batch that is not the keyed one
    assert not torch.equal(first, fixed)
    with pytest.raises(SnnadvError, match="enclosing"):
        with encoder_keys(snn, 1):
            pass
    with encoder_keys(ANN(get_spec("tiny", 10)), 1, torch.arange(3)) as none:  # an ANN: nothing to key
        assert none is None
