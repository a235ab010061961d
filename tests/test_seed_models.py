"""Tests of public/models/seed.py: the seed systems' models, at the seeds' own data shapes.

SEResNet1d at seed 002's (8 leads, 5000 samples, 2 classes) and HeartbeatCNN at seed 003's
(1 lead, 205 samples, 4 classes) get what tests/test_models.py gives every model of
public/model.py: a forward pass, a backward pass in which every parameter gets a finite
gradient, and an ONNX export that onnxruntime runs with outputs matching PyTorch.

Importing public.models.seed registers its models; the `seed_models` fixture undoes that
afterwards, because other test modules check the registry's exact contents.
"""

import numpy as np
import pytest
import torch

import public
import public.models.registry as registry
from public.compress.export import check_onnx, export_onnx




# (model name, in_channels, input_size, num_classes): the seeds' data shapes
SEED_SHAPES = [('SEResNet1d', 8, 5000, 2), ('HeartbeatCNN', 1, 205, 4)]
SHAPE_IDS = [s[0] for s in SEED_SHAPES]


def _batch(n, channels, length, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(
        (n, channels, length, 1)).astype(np.float32))


def _build(seed_models, name, channels, length, classes, **kwargs):
    torch.manual_seed(0)
    return getattr(seed_models, name)(input_size=length, in_channels=channels,
                                      num_classes=classes, **kwargs)


def test_seed_models_are_registered(seed_models):
    for name in ('SEResNet1d', 'HeartbeatCNN'):
        assert registry.get_model_class(name) is getattr(seed_models, name)


@pytest.mark.parametrize('name, channels, length, classes', SEED_SHAPES, ids=SHAPE_IDS)
def test_forward_and_backward(seed_models, name, channels, length, classes):
    model = _build(seed_models, name, channels, length, classes).train()
    out = model(_batch(4, channels, length))
    assert out.shape == (4, classes) and torch.isfinite(out).all()
    torch.nn.functional.cross_entropy(out, torch.arange(4) % classes).backward()
    missing = [n for n, p in model.named_parameters()
               if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing}"


@pytest.mark.parametrize('name, channels, length, classes', SEED_SHAPES, ids=SHAPE_IDS)
def test_onnx_export_matches_pytorch(seed_models, tmp_path, name, channels, length, classes):
    model = _build(seed_models, name, channels, length, classes).eval()
    path = tmp_path / f'{name}.onnx'
    size = export_onnx(model, str(path), in_channels=channels, input_size=length, opset=18)
    assert size == path.stat().st_size > 0
    sample = _batch(5, channels, length, seed=1).squeeze(-1).numpy()
    check_onnx(str(path), model, sample)


@pytest.mark.parametrize('name, channels, length, kwargs', [
    ('SEResNet1d', 1, 1250, {}),                     # the ATML demo's shape
    ('SEResNet1d', 12, 1000, {'blocks': (3, 4, 6, 3)}),   # PTB-XL leads, the seed's depth
    ('HeartbeatCNN', 1, 1250, {'fc_hidden': 64}),
    ('HeartbeatCNN', 2, 8, {'fc_hidden': 16}),       # the shortest input it takes
])
def test_other_input_shapes(seed_models, name, channels, length, kwargs):
    model = _build(seed_models, name, channels, length, 3, **kwargs).eval()
    with torch.no_grad():
        assert model(_batch(2, channels, length)).shape == (2, 3)


@pytest.mark.parametrize('length, flatten', [(205, 256 * 25), (1250, 256 * 156), (8, 256)])
def test_heartbeat_cnn_flatten_width_follows_input_size(seed_models, length, flatten):
    model = seed_models.HeartbeatCNN(input_size=length, num_classes=4, fc_hidden=8)
    assert model.head[1].in_features == flatten     # the seed hard-coded 256 * 25 for 205


def test_heartbeat_cnn_keeps_the_seed_head_by_default(seed_models):
    model = seed_models.HeartbeatCNN(input_size=205, num_classes=4)
    widths = [m.out_features for m in model.head if isinstance(m, torch.nn.Linear)]
    assert widths == [4096, 64, 4]


def test_too_short_input_is_a_clear_error(seed_models):
    with pytest.raises(ValueError, match=r"input_size=7 is too short for HeartbeatCNN"):
        seed_models.HeartbeatCNN(input_size=7)


def test_se_resnet_is_small_and_stages_must_match(seed_models):
    model = seed_models.SEResNet1d(input_size=5000, in_channels=8)
    assert sum(p.numel() for p in model.parameters()) < 300_000
    with pytest.raises(ValueError, match=r"one entry per stage"):
        seed_models.SEResNet1d(channels=(16, 32), blocks=(1, 1, 1))
