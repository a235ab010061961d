"""Tests over the whole model registry (timm style) and the stage-two model at several widths.

Every class in public.model.model_classes, public.ss_model.AFNet (BudgetNet) and the
AFNet scaling of examples/ss_model_afnet.py at several (channel, fc) factors, gets: a forward pass on a demo-shaped batch, a backward pass in
which every parameter gets a finite gradient, and an ONNX export that onnxruntime loads
on its own (one self-contained file) with outputs matching PyTorch. A newly registered
model is covered without anyone writing a test for it.
"""
import os
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import public.models.registry as registry
from public import ss_model
from public.models.blocks import afnet_config
from public.compress.export import check_onnx, export_onnx
from public.model import model_classes
from conftest import load_ss_model

afnet_ss = load_ss_model()          # examples/ss_model_afnet.py

SS_FACTORS = [(1, 1), (2, 3), (5, 5)]


def _registered(input_size=1250, in_channels=1):
    return [pytest.param(lambda cls=cls, n=input_size, c=in_channels:
                         cls(input_size=n, in_channels=c, num_classes=2), id=cls.__name__)
            for cls in model_classes]


def _stage_two(input_size=1250, in_channels=1):
    return [pytest.param(lambda cf=cf, n=input_size, c=in_channels, m=m: m.AFNet(
        m.generate_config(*cf, n, in_channels=c)), id=f'{label}-c{cf[0]}-f{cf[1]}')
        for cf in SS_FACTORS for label, m in (('ss_model', ss_model), ('afnet_ss', afnet_ss))]


ALL_MODELS = _registered() + _stage_two()


def _batch(n=4, channels=1, length=1250, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(
        (n, channels, length, 1)).astype(np.float32))


def test_registry_order_and_names():
    names = [m.__name__ for m in model_classes]
    assert names[:3] == ['AFNet', 'ShuffleNetV2', 'OptimizedAFNet']
    assert [m.__name__ for m in registry.model_classes()][:len(names)] == names
    assert len(set(names)) == len(names)
    for cls in model_classes:
        assert registry.get_model_class(cls.__name__) is cls


def test_duplicate_model_name_is_an_error(monkeypatch):
    monkeypatch.setattr(registry, '_REGISTRY', dict(registry._REGISTRY))
    existing = model_classes[0]
    assert registry.register_model(existing) is existing           # same class again: fine
    impostor = type(existing.__name__, (nn.Module,), {})
    with pytest.raises(ValueError, match=rf"model name '{existing.__name__}' is already "
                                         rf"registered .*must be unique"):
        registry.register_model(impostor)
    assert registry.get_model_class(existing.__name__) is existing


def test_new_model_registers_in_order(monkeypatch):
    monkeypatch.setattr(registry, '_REGISTRY', dict(registry._REGISTRY))

    @registry.register_model
    class ZzTestModel(nn.Module):
        pass
    assert registry.model_classes()[-1] is ZzTestModel
    assert registry.get_model_class('ZzTestModel') is ZzTestModel


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(KeyError, match=r"unknown model 'NoSuchNet'; registered models: AFNet, "
                                       r"ShuffleNetV2, OptimizedAFNet"):
        registry.get_model_class('NoSuchNet')


@pytest.mark.parametrize('build', ALL_MODELS)
def test_forward_gives_logits_per_segment(build):
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():
        out = model(_batch())
    assert out.shape == (4, 2)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize('build', ALL_MODELS)
def test_backward_gives_every_parameter_a_finite_gradient(build):
    torch.manual_seed(0)
    model = build().train()
    loss = nn.functional.cross_entropy(model(_batch()), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f'parameters without gradient: {missing}'
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f'non-finite gradients: {bad}'
    assert sum(p.grad.abs().sum().item() for p in model.parameters()) > 0


@pytest.mark.parametrize('build', ALL_MODELS)
def test_onnx_export_is_one_self_contained_file_matching_pytorch(build, tmp_path):
    torch.manual_seed(0)
    model = build()
    with torch.no_grad():
        model.train()(_batch(8, seed=1))          # non-default BatchNorm statistics
    model.eval()
    export_dir, alone = tmp_path / 'export', tmp_path / 'alone'
    export_dir.mkdir()
    alone.mkdir()
    size = export_onnx(model, str(export_dir / 'model.onnx'), in_channels=1, input_size=1250,
                       opset=18)
    assert os.listdir(export_dir) == ['model.onnx'], 'no side files (.onnx.data) or leftovers'
    assert size == os.path.getsize(export_dir / 'model.onnx')
    shutil.copy(export_dir / 'model.onnx', alone / 'model.onnx')
    session = ort.InferenceSession(str(alone / 'model.onnx'), providers=['CPUExecutionProvider'])
    [inp] = session.get_inputs()
    assert inp.shape[1:] == [1, 1250, 1]
    for n in (1, 3):                                   # dynamic batch axis
        x = _batch(n, seed=n)
        got = session.run(None, {inp.name: x.numpy()})[0]
        with torch.no_grad():
            expected = model(x).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)
    assert check_onnx(str(alone / 'model.onnx'), model, _batch(5, seed=7)[..., 0].numpy()) < 1e-4


@pytest.mark.parametrize('build', _registered(input_size=1000) + _stage_two(input_size=1000))
def test_layer_sizes_follow_another_input_size(build, tmp_path):
    model = build().eval()
    with torch.no_grad():
        assert model(_batch(2, length=1000)).shape == (2, 2)
    path = tmp_path / 'm.onnx'
    export_onnx(model, str(path), in_channels=1, input_size=1000, opset=18)
    check_onnx(str(path), model, _batch(2, length=1000)[..., 0].numpy())


@pytest.mark.parametrize('build', _registered(in_channels=3) + _stage_two(in_channels=3))
def test_multi_lead_input(build):
    model = build().train()
    out = model(_batch(4, channels=3))
    assert out.shape == (4, 2)
    out.sum().backward()


@pytest.mark.parametrize('build', ALL_MODELS[:1] + ALL_MODELS[-1:])
def test_wrong_input_layout_is_a_clear_error(build):
    with pytest.raises(ValueError, match=r'model input must have shape \(N, C, L, 1\), got '
                                         r'\(4, 1, 1250\)'):
        build()(_batch()[..., 0])


@pytest.mark.parametrize('c,f', SS_FACTORS)
def test_the_afnet_scaling_scales_channels_and_fc(c, f):
    config = afnet_ss.generate_config(c, f, 1250)
    assert config['channels'] == [c * b for b in (1, 2, 4, 8, 8)]
    assert config['fc_hidden'] == 5 * f
    model = afnet_ss.AFNet(config)
    assert model.head[2].in_features == config['fc_in']
    assert afnet_ss.generate_config(c, f, 1000)['fc_in'] < config['fc_in']


@pytest.mark.parametrize('c,f', SS_FACTORS)
def test_the_default_stage_two_scales_widths_and_head(c, f):
    config = ss_model.generate_config(c, f, 1250)
    assert config['channels'] == [c * b for b in (4, 6, 8, 12, 16)]
    assert config['fc_hidden'] == 8 * f
    model = ss_model.AFNet(config)
    assert model.head[1].in_features == config['channels'][-1]
    assert ss_model.generate_config(c, f, 1000) == dict(config, input_size=1000)


def test_the_afnet_scaling_at_channel_4_fc_2_is_stage_one_afnet():
    a = afnet_ss.AFNet(afnet_ss.generate_config(4, 2, 1250))
    b = registry.get_model_class('AFNet')(input_size=1250)
    assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]


def test_input_too_short_for_the_conv_stack_is_named():
    with pytest.raises(ValueError, match=r'input_size=40 is too short for kernels'):
        afnet_config(channels=(4, 8, 16, 32, 32), kernels=(6, 5, 4, 4, 4), fc_hidden=10,
                     input_size=40)


@pytest.mark.parametrize('build', ALL_MODELS[:3])
def test_state_dict_round_trips_with_weights_only(build, tmp_path):
    torch.manual_seed(0)
    model = build()
    with torch.no_grad():
        model.train()(_batch(8))
    torch.save(model.state_dict(), tmp_path / 'saved.pth')
    torch.manual_seed(1)
    other = build()
    other.load_state_dict(torch.load(tmp_path / 'saved.pth', weights_only=True))
    x = _batch(3, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), other.eval()(x))
