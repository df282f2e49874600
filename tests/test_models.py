"""Architectures (paper Sec. 3.1) built from one spec as ANN and SNN, and the SNN's
two executions (fused scan vs the step-by-step reference)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from snnadv.checkpoint import load_weights
from snnadv.errors import CheckpointError, SnnadvError
from snnadv.models import ANN, ARCHS, SNN, ArchSpec, get_spec
from snnadv.models.spec import Act, AvgPool, Block, Conv, Dropout, Linear
from snnadv.neurons import LIF
from snnadv.surrogates import make_surrogate

CLASSES = {"vgg5": 10, "vgg11": 100, "resnet20": 10, "tiny": 10}


@pytest.fixture(scope="module")
def built():
    """ANN and SNN of every architecture (VGG11 is 35M parameters: build once)."""
    torch.manual_seed(0)
    out = {}
    for arch, n in CLASSES.items():
        spec = get_spec(arch, n)
        out[arch] = (spec, ANN(spec), SNN(spec, num_steps=2))
    return out


def _kinds(spec: ArchSpec, kind) -> list:
    return [l for l in spec.layers if isinstance(l, kind)]


# -- structure ---------------------------------------------------------------------------


def test_all_architectures_are_registered():
    assert set(ARCHS) == {"vgg5", "vgg11", "resnet20", "tiny"}


def test_unknown_architecture_is_a_one_line_error():
    with pytest.raises(SnnadvError) as e:
        get_spec("vgg16", 10)
    assert "vgg16" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("arch", list(CLASSES))
def test_ann_output_shape(built, arch):
    spec, ann, _ = built[arch]
    ann.eval()
    with torch.no_grad():
        out = ann(torch.rand(3, 3, 32, 32))
    assert out.shape == (3, CLASSES[arch])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("arch", list(CLASSES))
def test_snn_output_shape(built, arch):
    spec, _, snn = built[arch]
    snn.eval()
    with torch.no_grad():
        out = snn(torch.rand(2, 3, 32, 32), num_steps=2)
    assert out.shape == (2, CLASSES[arch])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("arch", list(CLASSES))
def test_no_bias_no_batchnorm_no_maxpool(built, arch):
    _, ann, snn = built[arch]
    for model in (ann, snn):
        names = [n for n, _ in model.named_parameters()]
        assert names, "the model has no parameters"
        assert not [n for n in names if n.endswith("bias")]
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                assert m.bias is None
            assert not isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.MaxPool2d, nn.MaxPool1d,
                                      nn.AdaptiveMaxPool2d))


@pytest.mark.parametrize("arch", list(CLASSES))
def test_ann_and_snn_have_the_same_parameter_names(built, arch):
    _, ann, snn = built[arch]
    assert [n for n, _ in ann.named_parameters()] == [n for n, _ in snn.named_parameters()]
    # every ReLU of the ANN is a spiking neuron of the SNN, in the same place
    relus = [n for n, m in ann.named_modules() if isinstance(m, nn.ReLU)]
    assert relus == snn.neuron_names
    assert all(isinstance(m, LIF) for m in snn.neurons)


def test_vgg5_layer_sequence():
    """conv3-64, avgpool, conv3-128 (x2), avgpool, fc1024 (x2), fc10 (paper Sec. 3.1)."""
    spec = get_spec("vgg5", 10)
    seq = []
    for l in spec.layers:
        if isinstance(l, Conv):
            assert (l.k, l.stride, l.pad) == (3, 1, 1)
            seq.append(f"conv{l.cout}")
        elif isinstance(l, AvgPool):
            assert l.k == 2
            seq.append("avgpool")
        elif isinstance(l, Linear):
            seq.append(f"fc{l.fout}")
    assert seq == ["conv64", "avgpool", "conv128", "conv128", "avgpool", "fc1024", "fc1024", "fc10"]
    # the classifier is the last layer and has no activation after it
    assert isinstance(spec.layers[-1], Linear) and spec.layers[-1].fout == 10
    assert get_spec("vgg5", 100).layers[-1].fout == 100


def _check_dropout_rule(spec: ArchSpec):
    layers = list(spec.layers)
    acts = 0
    for i, l in enumerate(layers):
        if isinstance(l, Act):
            acts += 1
            nxt = layers[i + 1]
            assert isinstance(nxt, (Dropout, AvgPool)), f"{l.name} is followed by {nxt}"
            if isinstance(nxt, Dropout):
                assert 0.0 < nxt.p < 1.0
        if isinstance(l, Dropout):
            assert isinstance(layers[i - 1], Act), f"{l.name} does not follow an activation"
    return acts


@pytest.mark.parametrize("arch", list(CLASSES))
def test_dropout_after_every_activation_not_followed_by_pooling(arch):
    spec = get_spec(arch, CLASSES[arch])
    assert _check_dropout_rule(spec) > 0
    # inside a residual block the first ReLU is followed by dropout
    for b in _kinds(spec, Block):
        assert 0.0 < b.p < 1.0


def test_vgg5_dropout_placement_exactly():
    names = [type(l).__name__ for l in get_spec("vgg5", 10).layers]
    assert names == ["Conv", "Act", "AvgPool", "Conv", "Act", "Dropout", "Conv", "Act", "AvgPool", "Flatten",
                     "Linear", "Act", "Dropout", "Linear", "Act", "Dropout", "Linear"]


def test_vgg11_has_8_convs_and_3_linear(built):
    spec, ann, _ = built["vgg11"]
    convs = _kinds(spec, Conv)
    assert len(convs) == 8
    assert [c.cout for c in convs] == [64, 128, 256, 256, 512, 512, 512, 512]
    assert len(_kinds(spec, Linear)) == 3
    assert spec.layers[-1].fout == 100
    assert sum(isinstance(m, nn.Conv2d) for m in ann.modules()) == 8
    assert sum(isinstance(m, nn.Linear) for m in ann.modules()) == 3
    assert sum(isinstance(m, nn.AvgPool2d) for m in ann.modules()) == 4


def test_resnet20_structure(built):
    spec, ann, snn = built["resnet20"]
    stem = [l for l in spec.layers if isinstance(l, Conv)]
    assert [(c.cin, c.cout, c.k) for c in stem] == [(3, 16, 3), (16, 16, 3)]
    blocks = _kinds(spec, Block)
    assert len(blocks) == 9
    assert [b.cout for b in blocks] == [16] * 3 + [32] * 3 + [64] * 3
    assert [b.stride for b in blocks] == [1, 1, 1, 2, 1, 1, 2, 1, 1]
    # He et al.'s CIFAR ResNet: 16 channels out of the stem, so only the two
    # downsampling blocks (16->32, 32->64) need a projection shortcut
    proj = [b.name for b in blocks if b.projection]
    assert proj == ["layer2_0", "layer3_0"]
    shortcuts = [n for n, m in ann.named_modules() if n.endswith("shortcut") and isinstance(m, nn.Conv2d)]
    assert shortcuts == ["layer2_0.shortcut", "layer3_0.shortcut"]
    assert len(_kinds(spec, Linear)) == 1
    # 2 stem + 18 block convs + 1 classifier = 21 weight layers on the main path (+2 projections)
    assert sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in ann.modules()) == 21 + 2
    assert len(snn.neurons) == 2 + 2 * 9
    params = sum(p.numel() for p in ann.parameters())
    assert 0.26e6 < params < 0.29e6, params


def test_spec_round_trip():
    for arch, n in CLASSES.items():
        spec = get_spec(arch, n)
        d = spec.to_dict()
        assert ArchSpec.from_dict(d) == spec
        # plain data only (a checkpoint must load with weights_only=True)
        assert all(isinstance(rec, dict) and isinstance(rec["kind"], str) for rec in d["layers"])


@pytest.mark.parametrize("arch", list(CLASSES))
def test_activations_list_matches_snn_neurons(built, arch):
    spec, _, snn = built[arch]
    assert spec.activations == snn.neuron_names


def test_widest_activation_vgg5():
    # conv1 output: 64 channels at 32x32
    assert get_spec("vgg5", 10).widest_activation() == 64 * 32 * 32


# -- weights -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["tiny", "resnet20", "vgg5"])
def test_ann_state_dict_loads_into_snn(built, arch):
    _, ann, snn = built[arch]
    target = SNN(get_spec(arch, CLASSES[arch]))
    load_weights(target, ann.state_dict())
    own = dict(ann.named_parameters())
    for name, p in target.named_parameters():
        assert torch.equal(p, own[name]), name
    # neuron settings are not weights: thresholds and leak keep their values
    assert all(v == 1.0 for v in target.thresholds().values())


def test_foreign_state_dict_is_a_one_line_checkpoint_error(built):
    _, vgg5, _ = built["vgg5"]
    tiny = ANN(get_spec("tiny", 10))
    with pytest.raises(CheckpointError) as e:
        load_weights(tiny, vgg5.state_dict())
    msg = str(e.value)
    assert "\n" not in msg and "tiny" in msg
    # wrong number of classes: a shape mismatch, also one line
    with pytest.raises(CheckpointError) as e:
        load_weights(ANN(get_spec("tiny", 100)), tiny.state_dict())
    assert "\n" not in str(e.value) and "classifier" in str(e.value)


def test_snn_moves_between_devices_and_dtypes():
    """``.to()`` / ``.float()`` go through nn.Module._apply: the SNN must not shadow it."""
    snn = SNN(get_spec("tiny", 10), num_steps=2)
    assert snn.to("cpu") is snn
    snn.float().eval()
    with torch.no_grad():
        assert snn(torch.rand(1, 3, 32, 32)).shape == (1, 10)


# -- the SNN's two executions ------------------------------------------------------------


def _snn(arch: str, surrogate: str = "stdb", thr: float = 0.3, **kw) -> SNN:
    torch.manual_seed(1)
    snn = SNN(get_spec(arch, 10), num_steps=8, surrogate=make_surrogate(surrogate), **kw)
    snn.set_thresholds({n: thr for n in snn.neuron_names})
    return snn.eval()


def _frames(T=8, B=2, seed=3, p=0.4):
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((T, B, 3, 32, 32), p), generator=g)


def _spike_counts(snn: SNN, frames: torch.Tensor) -> dict[str, float]:
    counts = {}

    def hook(name):
        def f(mod, inp, out):
            counts[name] = counts.get(name, 0.0) + float(out[0].sum())  # (spk, mem)
        return f

    handles = []
    for name, m in snn.named_modules():
        if isinstance(m, LIF):
            handles.append(m.register_forward_hook(hook(name)))
    with torch.no_grad():
        snn.mode = "reference"
        snn.forward_frames(frames)
    for h in handles:
        h.remove()
    return counts


@pytest.mark.parametrize("arch", ["tiny", "resnet20"])
@pytest.mark.parametrize("surrogate", ["stdb", "linear"])
def test_fused_equals_reference(arch, surrogate):
    snn = _snn(arch, surrogate)
    frames = _frames()
    # the comparison only means something if every layer spikes
    counts = _spike_counts(snn, frames)
    assert len(counts) == len(snn.neurons) and all(c > 0 for c in counts.values()), counts
    results = {}
    for mode in ("fused", "reference"):
        snn.mode = mode
        f = frames.clone().requires_grad_(True)
        logits = snn.forward_frames(f)
        w = torch.linspace(-1, 1, logits.numel()).reshape(logits.shape)
        (logits * w).sum().backward()
        results[mode] = (logits.detach(), f.grad)
    (l_f, g_f), (l_r, g_r) = results["fused"], results["reference"]
    torch.testing.assert_close(l_f, l_r, rtol=1e-5, atol=1e-5)
    assert g_f.abs().max() > 0, "no input gradient at all"
    torch.testing.assert_close(g_f, g_r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["tiny", "resnet20"])
def test_fused_chunked_equals_unchunked(arch):
    snn = _snn(arch, "linear")
    frames = _frames()
    out = {}
    for chunk in (None, 3):
        snn.chunk_steps = chunk
        f = frames.clone().requires_grad_(True)
        logits = snn.forward_frames(f)
        logits.pow(2).sum().backward()
        out[chunk] = (logits.detach(), f.grad)
    torch.testing.assert_close(out[None][0], out[3][0], rtol=1e-6, atol=1e-6)
    assert out[None][1].abs().max() > 0
    torch.testing.assert_close(out[None][1], out[3][1], rtol=1e-5, atol=1e-6)


def test_fused_equals_reference_in_training_mode_with_dropout():
    """Dropout masks are drawn once per forward, in the same order in both executions."""
    snn = _snn("tiny", "linear")
    snn.train()
    frames = _frames()
    out = {}
    for mode in ("fused", "reference"):
        snn.mode = mode
        torch.manual_seed(7)
        out[mode] = snn.forward_frames(frames)
    torch.testing.assert_close(out["fused"], out["reference"], rtol=1e-5, atol=1e-5)
    snn.eval()
    torch.manual_seed(7)
    assert not torch.allclose(snn.forward_frames(frames), out["fused"])


def test_forward_curve_matches_forward():
    snn = _snn("tiny")
    x = torch.rand(3, 3, 32, 32)

    def gen():
        return torch.Generator().manual_seed(11)

    with torch.no_grad():
        snn.encoder.generator = gen()
        curve = snn.forward_curve(x, [2, 4, 8])
        snn.encoder.generator = gen()
        full = snn(x, num_steps=8)
        snn.encoder.generator = gen()
        frames = snn.encoder(x, 8)
        snn.encoder.generator = None
        assert curve.shape == (3, 3, 10)
        assert torch.equal(curve[-1], full)
        # each point of the curve is the network run on the first t frames of the same draw
        for i, t in enumerate([2, 4, 8]):
            torch.testing.assert_close(curve[i], snn.forward_frames(frames[:t]), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(curve[0], curve[-1])


def test_logits_are_accumulated_output_over_T():
    """No threshold in the output layer: logits = classifier(mean of the last spikes)."""
    snn = _snn("tiny")
    frames = _frames(T=5)
    captured = []
    handle = snn.act3.register_forward_hook(lambda m, i, o: captured.append(o[0]))  # (spk, mem)
    snn.mode = "reference"
    with torch.no_grad():
        logits = snn.forward_frames(frames)
    handle.remove()
    spikes = torch.stack(captured)  # [T, B, 64]
    assert spikes.shape == (5, 2, 64)
    expected = snn.classifier(spikes.mean(0))
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)


def test_timesteps_must_be_positive():
    snn = SNN(get_spec("tiny", 10), num_steps=4)
    with pytest.raises(SnnadvError):
        snn(torch.rand(1, 3, 32, 32), num_steps=-3)
    with pytest.raises(SnnadvError):
        snn.forward_curve(torch.rand(1, 3, 32, 32), [0, 4])
    for bad in (0, -1, 2.5):
        with pytest.raises(SnnadvError):
            SNN(get_spec("tiny", 10), num_steps=bad)


def test_zero_timesteps_in_forward_is_an_error():
    snn = SNN(get_spec("tiny", 10), num_steps=4)
    with pytest.raises(SnnadvError):
        snn(torch.rand(1, 3, 32, 32), num_steps=0)
