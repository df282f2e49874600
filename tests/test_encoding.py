"""Input encoding (paper Sec. 2.2): rate coding, b-bit pre-quantisation, the signed
mode of the original code, explicit generators and the straight-through gradient."""

from __future__ import annotations

import pytest
import torch
from snntorch import spikegen

from snnadv.encoding import RateEncoder, check_bits, normalize, quantize, rate
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
