"""Tests of the budget-native stage-two architecture (public/models/budget.py), the default
public/ss_model.py, and the AFNet scaling of examples/ss_model_afnet.py that it replaced
(issue 20): through stage two's own code."""
import functools
import importlib.util
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from public.compress.export import export_onnx, like_trained, onnx_predict
from public.data.prepare import PreparedData, TrialData, calibration_sample
from public.models.budget import BudgetNet, budget_config

EXAMPLES = {'budget': ROOT / 'public' / 'ss_model.py',
            'afnet': ROOT / 'examples' / 'ss_model_afnet.py'}


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"ss_model_{name}", EXAMPLES[name])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def budget_stage_two():
    """The default public/ss_model.py: BudgetNet."""
    from public import ss_model
    return ss_model


def synthetic_data(n=48, length=1250, seed=0):
    """Class 1: a noisy 7 Hz-ish oscillation; class 0: noise. Two subjects per split."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    t = np.arange(length) / 250
    x = rng.normal(0, 0.3, (n, 1, length)) + y[:, None, None] * np.sin(2 * np.pi * 7 * t)
    x = torch.from_numpy(x.astype(np.float32))
    y = torch.from_numpy(y.astype(np.int64))
    tr, va, te = slice(0, 32), slice(32, 40), slice(40, n)
    subjects = np.array(['S1', 'S2'] * (n // 2))
    return PreparedData(trial=TrialData(x[tr], y[tr], x[va], y[va]), x_test=x[te],
                        y_test=y[te].numpy(), onnx_sample=x[va].numpy(), in_channels=1,
                        input_size=length, num_classes=2, device=torch.device('cpu'),
                        summary='', val_subjects=subjects[va], test_subjects=subjects[te])


def test_the_int8_grid_holds_wide_candidates_under_20_kb(budget_stage_two, make_settings):
    from public.search.stage_two import SizeBudget, plan_candidates
    settings = make_settings(QUANTIZE_INT8=True, SIZE_TARGET_KB=20,
                             CHANNEL_SCALES=(1, 2, 3, 4, 5), FC_SCALES=(1, 2, 3, 4, 5))
    calibration = calibration_sample(synthetic_data(), count=16)
    plan = plan_candidates(settings, 1250, 1, 2, calibration_x=calibration)
    size = {(k.channel_scale, k.fc_scale): k.predicted_bytes for k in plan}
    assert len(size) == 25
    budget = SizeBudget(20)
    wide = [k for k in plan if budget.fits(k.predicted_bytes) and k.config['channels'][0] > 1]
    assert len(wide) >= 6
    assert any(not budget.fits(b) for b in size.values()), 'the grid reaches past the target'
    for f in range(1, 6):      # growing with the channel factor, at every fc factor
        assert all(size[c, f] < size[c + 1, f] for c in range(1, 5))
    for c in range(1, 6):      # and with the fc factor, over its range by less than one
        assert all(size[c, f] < size[c, f + 1] for f in range(1, 5))      # channel step
        assert c == 5 or size[c, 5] - size[c, 1] < size[c + 1, 1] - size[c, 1]


def test_the_file_size_does_not_grow_with_the_input_length(tmp_path):
    sizes = [export_onnx(like_trained(BudgetNet(budget_config(3, 2, n))), str(tmp_path / 'm.onnx'),
                         1, n, 18) for n in (500, 1250, 5000)]
    assert len(set(sizes)) == 1


def test_too_short_an_input_or_a_zero_factor_is_a_clear_error():
    with pytest.raises(ValueError, match='too short'):
        budget_config(1, 1, 16)
    with pytest.raises(ValueError, match='>= 1'):
        budget_config(0, 1, 1250)


def test_stage_two_trains_quantizes_and_the_files_compute_the_torch_model(budget_stage_two,
                                                                          make_settings):
    from public.search.stage_two import build_from_config
    from public.search.trial import TrialSpec, run_trial_job
    settings = make_settings(QUANTIZE_INT8=True, SIZE_TARGET_KB=20, NUM_EPOCHS=2,
                             AUGMENT=False, TEST_DIR='')
    data = synthetic_data()
    config = budget_stage_two.generate_config(1, 1, 1250)
    spec = TrialSpec(key='c1-f1', build=functools.partial(build_from_config, config),
                     lr=0.003, settings=settings, quantize=True)
    result = run_trial_job(spec, data)
    assert result.status == 'ok', result.error
    assert result.epochs == 2 and result.int8['bytes'] <= 20 * 1024
    model = BudgetNet(config)
    model.load_state_dict(result.state_dict)
    model.eval()
    x = data.x_test.numpy()
    with torch.no_grad():
        expected = model(data.x_test.unsqueeze(-1)).numpy()
    paths = {}
    for kind, blob in (('float', result.onnx), ('int8', result.int8_onnx)):
        paths[kind] = settings.TEMP_DIR + f"/{kind}.onnx"
        with open(paths[kind], 'wb') as f:
            f.write(blob)
    np.testing.assert_allclose(onnx_predict(paths['float'], x), expected, atol=1e-4, rtol=1e-3)
    got = onnx_predict(paths['int8'], x)
    assert np.abs(got - expected).max() < 0.1 * np.abs(expected).max() + 0.02
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.85


@pytest.mark.parametrize('name', ['budget', 'afnet'])
def test_the_examples_are_drop_in_ss_models(name):
    module = load_example(name)
    for c, f in ((1, 1), (3, 2), (5, 5)):
        model = module.AFNet(module.generate_config(c, f, 1250, in_channels=1, num_classes=2))
        with torch.no_grad():
            assert tuple(model.eval()(torch.zeros(2, 1, 1250, 1)).shape) == (2, 2)
    config = module.generate_config(4, 2, 1250)
    if name == 'budget':
        assert module.AFNet.__name__ == 'BudgetNet' and config == budget_config(4, 2, 1250)
        assert config['channels'] == [16, 24, 32, 48, 64] and config['fc_hidden'] == 16
    else:       # today's scaling: channel 4, fc 2 is stage one's AFNet
        assert config['channels'] == [4, 8, 16, 32, 32] and config['fc_hidden'] == 10


def test_run_stage_two_scales_and_publishes_the_budget_net(budget_stage_two, prepared,
                                                           make_settings):
    """The whole stage two with the default public/ss_model.py (BudgetNet) and the real
    trainer: planned, trained, quantized, published (the best under the cap); the log names BudgetNet."""
    import os
    from public.core.interrupts import NoInterrupts
    from public.search.stage_two import run_stage_two
    settings = make_settings(QUANTIZE_INT8=True, SIZE_TARGET_KB=20, METRIC_TARGET=100,
                             CHANNEL_SCALES=(1, 5), FC_SCALES=(1,), AUGMENT=False)
    lines = []
    folder, met, rows = run_stage_two(settings, prepared, NoInterrupts(), log=lines.append,
                                      progress=False)
    status = {r['candidate']: r['status'] for r in rows}
    assert not met and status == {'c1-f1': 'ok', 'c5-f1': 'over-size'}, status
    assert 'Stage two scales BudgetNet of' in '\n'.join(lines)
    assert os.path.getsize(os.path.join(folder, 'saved.int8.onnx')) <= 20 * 1024
