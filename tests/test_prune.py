"""Tests of public/compress/channel_prune.py: structured pruning that shrinks the ONNX file, and its size plan.

The stage-two AFNet at several widths, SepNet (depthwise groups) and OptimizedAFNet are
pruned; the kept channels are checked against weights built so their L1 order is known,
and a model whose removed channels are made dead must compute exactly what it computed
before pruning (a wrong Flatten -> Linear column map or a missed consumer breaks that).
"""
import copy
import functools
import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import public.ss_model as budget_ss
from conftest import load_ss_model
from public.models.blocks import to_1d
from public.core.errors import SettingsError
from public.compress.export import check_onnx, export_onnx
from public.model import OptimizedAFNet, ShuffleNetV2
from public.compress.channel_prune import (_trace, copy_builder, kept_units, prune_model,
                                           pruned_probe, pruned_size, unstructured_prune)
from public.train.recipe import add_normalization
from public.compress.export import like_trained
from public.models.small import SepNet

L = 1250
OPSET = 18


ss_model = load_ss_model()        # the AFNet width scaling of examples/ss_model_afnet.py


def _budget(c, f):
    return budget_ss.AFNet(budget_ss.generate_config(c, f, L))


def _afnet(c, f, in_channels=1, num_classes=2):
    return ss_model.AFNet(ss_model.generate_config(c, f, L, in_channels=in_channels,
                                                   num_classes=num_classes))


def _example(in_channels=1, n=4, seed=0):
    return torch.randn(n, in_channels, L, 1, generator=torch.Generator().manual_seed(seed))


def _params(model):
    return sum(p.numel() for p in model.parameters())


def _size(model, path, in_channels=1):
    return export_onnx(model, str(path), in_channels, L, OPSET)


def _perturb(model, seed=3):
    """Every float tensor moved by its own random amount: 'trained' weights, distinct values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.add_(0.2 * torch.randn(t.shape, generator=g)).abs_().add_(0.01)
    return model


BUILDS = {
    'ss-c1-f1': functools.partial(_afnet, 1, 1),
    'ss-c2-f1': functools.partial(_afnet, 2, 1),
    'ss-c4-f2': functools.partial(_afnet, 4, 2),
    'ss-c3-f3': functools.partial(_afnet, 3, 3),
    'SepNet': SepNet,
    'OptimizedAFNet': OptimizedAFNet,
    'budget-c2-f2': functools.partial(_budget, 2, 2),      # the default public/ss_model.py
}


# ----------------------------------------------------------------------------- counts

@pytest.mark.parametrize('size,fraction,kept', [
    (4, 0.5, 2), (5, 0.5, 3), (10, 0.25, 8), (4, 0.75, 1), (1, 0.75, 1), (1, 0.5, 1),
    (100, 0.29, 71), (8, 0.0, 8), (3, 0.99, 1),
])
def test_kept_units(size, fraction, kept):
    assert kept_units(size, fraction) == kept


@pytest.mark.parametrize('fraction', [0, 0.0, 0.5, 0.99])
def test_fraction_accepts_range(fraction):
    prune_model(_afnet(1, 1), fraction, _example())


@pytest.mark.parametrize('fraction', [1, 1.0, -0.01, True, '0.5', None])
def test_fraction_rejected_past_range(fraction):
    with pytest.raises(SettingsError, match=r"fraction must be a number in the range \[0, 1\)"):
        prune_model(_afnet(1, 1), fraction, _example())


def test_fraction_zero_keeps_every_channel():
    model = _afnet(2, 1)
    pruned = prune_model(model, 0.0, _example())
    assert pruned is not model
    assert {k: v.shape for k, v in pruned.state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- shrink + export

@pytest.mark.parametrize('name', list(BUILDS))
def test_pruned_model_is_smaller_exports_and_matches_onnx(name, tmp_path):
    model = like_trained(BUILDS[name]()).eval()
    x = _example()
    pruned = prune_model(model, 0.5, x)
    assert _params(pruned) < _params(model)
    assert _size(pruned, tmp_path / 'p.onnx') < _size(model, tmp_path / 'm.onnx')
    assert pruned(x).shape == model(x).shape == (4, 2)
    assert not torch.isnan(pruned(x)).any()
    check_onnx(str(tmp_path / 'p.onnx'), pruned, x.squeeze(-1).numpy())
    assert type(pruned) is type(model)


@pytest.mark.parametrize('in_channels,num_classes', [(1, 2), (12, 4), (3, 5)])
def test_input_channels_and_classes_are_kept(in_channels, num_classes):
    model = _afnet(2, 2, in_channels, num_classes)
    pruned = prune_model(model, 0.75, _example(in_channels))
    first_conv = pruned.features[0][0]
    assert first_conv.in_channels == first_conv.weight.shape[1] == in_channels
    assert pruned.head[-1].out_features == num_classes
    assert pruned(_example(in_channels)).shape == (4, num_classes)
    assert first_conv.out_channels == kept_units(2, 0.75) == 1


def test_input_model_is_unchanged():
    model = _perturb(_afnet(2, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = [id(p) for p in model.parameters()]
    model.train()
    pruned = prune_model(model, 0.5, _example())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [id(p) for p in model.parameters()] == params_before
    assert model.training and pruned.training          # the training mode is kept
    assert model.features[0][0].out_channels == 2 and pruned.features[0][0].out_channels == 1


def test_pruned_model_pickles_and_trains(prepared, make_settings):
    from public.search.trial import run_trial
    pruned = prune_model(_perturb(_budget(2, 1)), 0.5, _example())     # importable by name
    again = pickle.loads(pickle.dumps(pruned))
    x = _example()
    assert torch.equal(again.eval()(x), pruned.eval()(x))
    build = pickle.loads(pickle.dumps(copy_builder(pruned)))   # what a Ray worker receives
    settings = make_settings()
    result = run_trial(build, 0.003, prepared, settings, os.path.join(settings.TEMP_DIR, 'p.onnx'),
                       progress=False, latency=False)
    assert result.status == 'ok', result.error
    assert result.params == _params(pruned)
    assert build() is not build()


def test_pruned_weights_reload_into_a_fresh_pruned_model():
    """Kept counts depend only on the fraction: a fresh model pruned the same way takes the
    fine-tuned pruned state dict (how a saved pruned candidate is rebuilt from its config)."""
    trained = prune_model(_short_training(_afnet(3, 2)), 0.5, _example())
    rebuilt = prune_model(_afnet(3, 2), 0.5, _example())
    rebuilt.load_state_dict(trained.state_dict())
    x = _example()
    assert torch.equal(rebuilt.eval()(x), trained.eval()(x))
    with pytest.raises(RuntimeError, match='size mismatch'):
        prune_model(_afnet(3, 2), 0.25, _example()).load_state_dict(trained.state_dict())


# ----------------------------------------------------------------------------- which channels

def _set_norms(weight, norms):
    """Rows of `weight` with the given L1 norms (constant magnitude, alternating signs)."""
    with torch.no_grad():
        per_row = weight[0].numel()
        signs = torch.where(torch.arange(per_row) % 2 == 0, 1.0, -1.0).reshape(weight[0].shape)
        for i, n in enumerate(norms):
            weight[i] = signs * (n / per_row)


def test_kept_channels_have_the_highest_l1_norm():
    model = _perturb(_afnet(1, 2))             # channels 1-2-4-8-8, SE hidden 1 and 2, fc 10
    f, head = model.features, model.head
    keep1, keep2, keep4, keep5, keep_se, keep_hidden = [1], [0, 2], [0, 2, 4, 6], [1, 3, 5, 7], \
        [1], [1, 3, 5, 7, 9]
    _set_norms(f[1][0].weight, [1.0, 2.0])
    _set_norms(f[2][0].weight, [3.0, 1.0, 4.0, 2.0])
    _set_norms(f[4][0].weight, [8, 1, 7, 2, 6, 3, 5, 4])
    _set_norms(f[5][0].weight, [1, 8, 2, 7, 3, 6, 4, 5])
    _set_norms(f[6].fc1.weight, [0.5, 0.6])
    _set_norms(head[2].weight, [1, 9, 2, 8, 3, 7, 4, 6, 5, 10])
    o = copy.deepcopy(model)
    p = prune_model(model, 0.5, _example())
    of, pf = o.features, p.features

    assert torch.equal(pf[1][0].weight, of[1][0].weight[keep1])
    assert torch.equal(pf[1][2].bias, of[1][2].bias[keep1])
    assert torch.equal(pf[2][0].weight, of[2][0].weight[keep2][:, keep1])
    assert torch.equal(pf[2][2].running_var, of[2][2].running_var[keep2])
    assert torch.equal(pf[3].fc1.weight, of[3].fc1.weight[:, keep2])     # SE hidden 1: kept
    assert torch.equal(pf[3].fc2.weight, of[3].fc2.weight[keep2])       # SE scales the conv's
    assert torch.equal(pf[3].fc2.bias, of[3].fc2.bias[keep2])           # channels: same ones
    assert torch.equal(pf[4][0].weight, of[4][0].weight[keep4][:, keep2])
    assert torch.equal(pf[5][0].weight, of[5][0].weight[keep5][:, keep4])
    assert torch.equal(pf[5][2].running_mean, of[5][2].running_mean[keep5])
    assert torch.equal(pf[6].fc1.weight, of[6].fc1.weight[keep_se][:, keep5])
    assert torch.equal(pf[6].fc2.weight, of[6].fc2.weight[keep5][:, keep_se])

    length = o.head[2].in_features // 8          # Flatten: channel c owns `length` features
    columns = [c * length + t for c in keep5 for t in range(length)]
    assert p.head[2].in_features == 4 * length
    assert torch.equal(p.head[2].weight, o.head[2].weight[keep_hidden][:, columns])
    assert torch.equal(p.head[2].bias, o.head[2].bias[keep_hidden])
    assert torch.equal(p.head[4].weight, o.head[4].weight[:, keep_hidden])
    assert torch.equal(p.head[4].bias, o.head[4].bias)


@pytest.mark.parametrize('name', list(BUILDS))
def test_pruning_dead_channels_leaves_outputs_unchanged(name):
    """Make the channels that will go dead (small producer weights, zero weights in every
    consumer): the pruned model must compute exactly what the whole model computes."""
    fraction = 0.5
    model = _perturb(BUILDS[name]()).eval()
    x = _example()
    tracer = _trace(copy.deepcopy(model), x)
    modules = dict(model.named_modules())
    dead_somewhere = False
    with torch.no_grad():
        for g in {tracer.find(i) for i in range(len(tracer.groups))}:
            group = tracer.groups[g]
            if group.frozen:
                continue
            dead = list(range(group.size - kept_units(group.size, fraction)))
            if not dead:
                continue
            dead_somewhere = True
            modules[group.producer].weight[dead] *= 1e-3
            for module_name, role, block in group.members:
                weight = modules[module_name].weight
                if role == 'conv_in':
                    weight[:, dead] = 0
                elif role == 'linear_in':
                    weight[:, [c * block + t for c in dead for t in range(block)]] = 0
    assert dead_somewhere
    expected = model(x)
    pruned = prune_model(model, fraction, x).eval()
    assert _params(pruned) < _params(model)
    torch.testing.assert_close(pruned(x), expected, rtol=1e-5, atol=1e-6)


class _Residual(nn.Module):
    """conv2's output is added to conv1's: their channels must be pruned together; the
    input is added to conv0's output, so conv0's channels (tied to the input) stay."""

    def __init__(self, in_channels=2):
        super().__init__()
        self.conv0 = nn.Conv1d(in_channels, in_channels, 5, padding=2)
        self.conv1 = nn.Conv1d(in_channels, 8, 9, 4)
        self.bn1 = nn.BatchNorm1d(8)
        self.conv2 = nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = to_1d(x)
        x = x + self.conv0(x)
        h = torch.relu(self.bn1(self.conv1(x)))
        return self.fc((h + self.conv2(h)).mean(dim=2))


def test_residual_sum_prunes_both_sides_together_and_keeps_input_channels(tmp_path):
    model = _perturb(_Residual()).eval()
    x = _example(2)
    pruned = prune_model(model, 0.5, x).eval()
    assert pruned.conv0.out_channels == 2                     # tied to the input: frozen
    assert pruned.conv1.out_channels == pruned.conv2.out_channels == 4
    assert pruned.conv2.in_channels == pruned.bn1.num_features == pruned.fc.in_features == 4
    keep = torch.topk(model.conv1.weight.abs().flatten(1).sum(1), 4).indices.sort().values
    assert torch.equal(pruned.conv2.weight, model.conv2.weight[keep][:, keep])
    assert pruned(x).shape == (4, 3)
    _size(pruned, tmp_path / 'r.onnx', in_channels=2)
    check_onnx(str(tmp_path / 'r.onnx'), pruned, x.squeeze(-1).numpy())


def test_sepnet_depthwise_groups_follow_their_channels(tmp_path):
    model = like_trained(SepNet()).eval()
    pruned = prune_model(model, 0.5, _example())
    depthwise = [m for m in pruned.modules() if isinstance(m, nn.Conv1d) and m.groups > 1]
    assert len(depthwise) == 4
    for conv in depthwise:
        assert conv.groups == conv.in_channels == conv.out_channels == conv.weight.shape[0]
        assert conv.weight.shape[1] == 1
    widths = [m.num_features for m in pruned.modules() if isinstance(m, nn.BatchNorm1d)]
    assert widths == [6, 6, 8, 8, 12, 12, 16, 16, 20]
    assert pruned.head[1].in_features == 20 and pruned.head[1].out_features == 2
    _size(pruned, tmp_path / 's.onnx')
    check_onnx(str(tmp_path / 's.onnx'), pruned, _example().squeeze(-1).numpy())


def test_normalization_hook_survives_pruning(tmp_path):
    model = add_normalization(like_trained(_afnet(1, 1))).eval()
    pruned = prune_model(model, 0.5, _example())
    assert getattr(pruned, 'atml_normalize', None) == 'segment'
    x = _example() * 50 + 7                         # standardised inside: same output
    torch.testing.assert_close(pruned(x), pruned(_example()), rtol=1e-4, atol=1e-4)
    _size(pruned, tmp_path / 'n.onnx')
    check_onnx(str(tmp_path / 'n.onnx'), pruned, x.squeeze(-1).numpy())


# ----------------------------------------------------------------------------- size plan

def _short_training(model, in_channels=1, steps=3):
    """A few real optimizer steps (train mode: BatchNorm statistics move too)."""
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    model.train()
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        x = torch.randn(8, in_channels, L, 1, generator=g)
        loss = nn.functional.cross_entropy(model(x), torch.randint(0, 2, (8,), generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize('name,fraction', [
    ('ss-c1-f1', 0.5), ('ss-c4-f2', 0.25), ('ss-c4-f2', 0.75), ('ss-c3-f3', 0.5),
    ('SepNet', 0.5), ('OptimizedAFNet', 0.25),
])
def test_pruned_size_is_exact_for_a_trained_model(name, fraction, tmp_path):
    build = BUILDS[name]
    predicted = pruned_size(build, fraction, 1, L, OPSET)
    trained = _short_training(build())
    actual = _size(prune_model(trained, fraction, _example()), tmp_path / 't.onnx')
    assert predicted == actual
    assert predicted < _size(trained, tmp_path / 'full.onnx')
    perturbed = _perturb(build(), seed=11).eval()
    assert _size(prune_model(perturbed, fraction, _example()), tmp_path / 'q.onnx') == predicted


def test_pruned_size_with_normalization_and_leads(tmp_path):
    def build():
        return add_normalization(_afnet(2, 1, in_channels=3))
    predicted = pruned_size(build, 0.5, 3, L, OPSET)
    trained = _short_training(build(), in_channels=3)
    assert _size(prune_model(trained, 0.5, _example(3)), tmp_path / 't.onnx', 3) == predicted


def test_pruned_probe_has_distinct_values_and_pruned_shapes():
    probe = pruned_probe(BUILDS['ss-c2-f1'], 0.5, 1, L)
    assert not probe.training
    assert {k: v.shape for k, v in probe.state_dict().items()} == \
        {k: v.shape for k, v in prune_model(_afnet(2, 1), 0.5, _example()).state_dict().items()}
    values = [t for t in probe.state_dict().values() if t.is_floating_point()]
    assert len({tuple(t.flatten().tolist()) for t in values}) == len(values)


def test_pruned_sizes_shrink_with_the_fraction():
    sizes = [pruned_size(BUILDS['ss-c4-f2'], f, 1, L, OPSET) for f in (0.0, 0.25, 0.5, 0.75)]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4


# ----------------------------------------------------------------------------- unsupported

class _WithLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 8, 9, 4)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        h = self.conv(to_1d(x)).transpose(1, 2)
        return self.fc(self.norm(h).mean(dim=1))


class _Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(1, 8, 9, 4)
        self.conv2 = nn.Conv1d(8, 8, 3, groups=2)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.conv2(self.conv1(to_1d(x))).mean(dim=2))


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 9, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = self.conv(x.squeeze(-1))
        if h.sum() > 0:                              # data-dependent control flow
            h = -h
        return self.fc(h.mean(dim=2))


@pytest.mark.parametrize('model,match', [
    (ShuffleNetV2(), r"cannot prune ShuffleNetV2: operator 'cat'"),
    (_WithLayerNorm(), r"cannot prune _WithLayerNorm: operator 'transpose'"),
    (_Grouped(), r"cannot prune _Grouped: layer 'conv2' \(Conv1d\) is a grouped convolution "
                 r"\(groups=2"),
    (_Untraceable(), r"cannot prune _Untraceable: torch.fx cannot trace"),
])
def test_unsupported_model_is_a_clear_error(model, match):
    with pytest.raises(SettingsError, match=match):
        prune_model(model, 0.5, _example())


def test_unknown_layer_in_channel_path_is_named():
    class _Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(1, 4, 9, 4)
            self.norm = nn.InstanceNorm1d(4, affine=True)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.norm(self.conv(to_1d(x))).mean(dim=2))
    with pytest.raises(SettingsError, match=r"layer 'norm' \(InstanceNorm1d\) is not a supported"):
        prune_model(_Custom(), 0.5, _example())


# ----------------------------------------------------------------------------- unstructured

@pytest.mark.parametrize('name', ['ss-c4-f2', 'SepNet'])
def test_unstructured_zeros_do_not_shrink_the_file(name, tmp_path):
    model = like_trained(BUILDS[name]()).eval()
    zeroed = unstructured_prune(model, 0.5)
    weights = [m.weight for m in zeroed.modules() if isinstance(m, (nn.Conv1d, nn.Linear))]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert 0.45 < zeros < 0.55                     # half the weights really are zero
    assert not any(hasattr(m, 'weight_orig') for m in zeroed.modules())   # made permanent
    dense = _size(model, tmp_path / 'dense.onnx')
    sparse = _size(zeroed, tmp_path / 'zeroed.onnx')
    assert abs(dense - sparse) <= 8
    assert pruned_size(BUILDS[name], 0.5, 1, L, OPSET) < dense * 0.6
    check_onnx(str(tmp_path / 'zeroed.onnx'), zeroed, np.asarray(_example().squeeze(-1)))
