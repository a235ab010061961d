"""Tests of public/search/stage_two.py: stage two's size plan, the size budget and the search order.

The search bookkeeping is driven through run_stage_two with a tiny fake trainer (the
`trainer=` argument) that returns chosen metrics per candidate and really exports the
candidate's model, so the tests check which candidates are trained, in which order, when
the search stops and what is published -- without training.
"""
import json
import os

import pytest
import torch

import public.ss_model as ss_model
from public.core.settings import SettingsError
from public.compress.export import export_onnx
from public.core.interrupts import NoInterrupts
from public.search.stage_two import SizeBudget, plan_candidates, run_stage_two
from public.test import score_digits
from public.search.trial import run_trial
from public.train.outcome import TrialResult, TrialStatus


@pytest.mark.parametrize('kb,size,fits', [
    (60, 61440, True), (60, 61441, False), (60, 0, True), (0.5, 512, True), (0.5, 513, False),
    (25, 25 * 1024, True), (25, 25 * 1024 + 1, False),
])
def test_size_budget(kb, size, fits):
    assert SizeBudget(kb).fits(size) is fits


# ----------------------------------------------------------------------------- the plan

SCALES = dict(CHANNEL_SCALES=(1, 2), FC_SCALES=(1, 2))


@pytest.fixture(scope='module')
def plan(tmp_path_factory, small_data):
    from conftest import PARAMS, settings_values
    from public.core.settings import load_settings
    out = tmp_path_factory.mktemp('plan')
    values = settings_values(out, small_data, **SCALES)
    settings = load_settings([f'{k}={v!r}' for k, v in values.items()], params_path=str(PARAMS))
    return plan_candidates(settings, 1250, 1)


def test_plan_lists_every_pair_smallest_first(plan, make_settings):
    assert sorted((k.channel_scale, k.fc_scale) for k in plan) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    sizes = [k.predicted_bytes for k in plan]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
    assert plan[0].name == 'c1-f1' and plan[-1].name == 'c2-f2'
    for k in plan:
        assert k.config == ss_model.generate_config(k.channel_scale, k.fc_scale, 1250)


def test_plan_leaves_no_probe_file(make_settings, tmp_path):
    settings = make_settings(CHANNEL_SCALES=(1,), FC_SCALES=(1,))
    plan_candidates(settings, 1250, 1)
    assert os.listdir(settings.TEMP_DIR) == []


def _export_size(model, path):
    return export_onnx(model, str(path), 1, 1250, 18)


def test_onnx_size_depends_only_on_the_architecture(tmp_path):
    config = ss_model.generate_config(1, 2, 1250)
    sizes = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        model = ss_model.AFNet(config)
        with torch.no_grad():
            model.train()(torch.randn(8, 1, 1250, 1) * (seed + 1))   # BatchNorm stats move
        sizes.append(_export_size(model, tmp_path / f'{seed}.onnx'))
    assert len(set(sizes)) == 1


def test_predicted_size_equals_the_trained_models_exported_size(plan, prepared, make_settings,
                                                                tmp_path):
    smallest = plan[0]
    result = run_trial(lambda: ss_model.AFNet(smallest.config), 0.003, prepared,
                       make_settings(NUM_EPOCHS=1), str(tmp_path / 'trained.onnx'),
                       progress=False, latency=False)
    assert result.status == TrialStatus.OK, result.error
    assert result.onnx_bytes == os.path.getsize(tmp_path / 'trained.onnx')
    assert result.onnx_bytes == smallest.predicted_bytes


def test_a_config_that_does_not_build_is_a_settings_error_naming_ss_model(monkeypatch, make_settings):
    def broken(c, f, input_size, **kw):
        raise ValueError('no such width')
    monkeypatch.setattr(ss_model, 'generate_config', broken)
    with pytest.raises(SettingsError, match=r'^public/ss_model\.py: generate_config\(1, 1, '
                                            r'input_size=1250\) does not give a model that builds '
                                            r'.*ValueError: no such width'):
        plan_candidates(make_settings(**SCALES), 1250, 1)


def test_a_config_with_the_wrong_output_is_a_settings_error(monkeypatch, make_settings):
    real = ss_model.generate_config
    monkeypatch.setattr(ss_model, 'generate_config',
                        lambda c, f, n, **kw: real(c, f, n, in_channels=1, num_classes=3))
    with pytest.raises(SettingsError, match=r'ss_model\.py: .*output shape \(2, 3\), expected \(2, 2\)'):
        plan_candidates(make_settings(**SCALES), 1250, 1)


def test_ss_model_without_afnet_is_a_settings_error(monkeypatch, make_settings):
    monkeypatch.delattr(ss_model, 'AFNet')
    with pytest.raises(SettingsError, match=r'public/ss_model\.py must define AFNet'):
        plan_candidates(make_settings(**SCALES), 1250, 1)


# ----------------------------------------------------------------------------- the search

def _metrics(v):
    return dict(f1=v, accuracy=v, precision=v, recall=v)


class FakeTrainer:
    """Stands in for run_trial: returns the outcome chosen for each candidate (by name)."""

    def __init__(self, outcomes, default=0.5):
        self.outcomes, self.default, self.calls = outcomes, default, []

    def __call__(self, build_model, lr, data, settings, onnx_path, progress=True, desc='', **kw):
        self.calls.append(desc)
        outcome = self.outcomes.get(desc, self.default)
        model = build_model()
        if outcome in ('failed', 'diverged'):
            return TrialResult(status=outcome, epochs=1, error=f'{outcome} on purpose',
                               stop_reason='diverged' if outcome == 'diverged' else '')
        return TrialResult(status=TrialStatus.OK, stop_reason='max-epochs', epochs=1, best_epoch=1,
                           val_metrics=_metrics(outcome), test_metrics=_metrics(outcome),
                           onnx_bytes=export_onnx(model, onnx_path, data.in_channels,
                                                  data.input_size, settings.ONNX_OPSET),
                           latency_ms=0.1, params=sum(p.numel() for p in model.parameters()),
                           state_dict=model.state_dict())


def _stage_two(settings, prepared, trainer):
    lines = []
    folder, met, rows = run_stage_two(settings, prepared, NoInterrupts(), log=lines.append,
                                      progress=False, trainer=trainer)
    return folder, met, rows, '\n'.join(lines)


def _cap_kb(plan, feasible):
    """A SIZE_TARGET_KB that admits exactly the `feasible` smallest candidates."""
    return (plan[feasible - 1].predicted_bytes + plan[feasible].predicted_bytes) / 2 / 1024


# (outcome per feasible candidate by size rank, METRIC_TARGET) -> (ranks trained, winner rank)
SEARCHES = [
    ({0: 0.95, 1: 0.99, 2: 0.99}, 90, [0], 0),              # the smallest meets: stop there
    ({0: 0.50, 1: 0.93, 2: 0.99}, 90, [0, 1], 1),            # smallest that meets, not the best
    ({0: 0.90, 1: 0.99}, 90, [0], 0),                        # yy == target meets
    ({0: 0.8999, 1: 0.91}, 90, [0, 1], 1),                   # yy 89 < 90 does not
    ({0: 'failed', 1: 0.95}, 90, [0, 1], 1),                 # a failed candidate: go on
    ({0: 'diverged', 1: 0.5, 2: 0.95}, 90, [0, 1, 2], 2),
    ({0: 0.60, 1: 0.80, 2: 0.70}, 90, [0, 1, 2], None),      # nothing meets: best under cap
]


@pytest.mark.parametrize('outcomes,target,trained,winner', SEARCHES)
def test_stage_two_search_order_and_stop(plan, prepared, make_settings, outcomes, target,
                                         trained, winner):
    settings = make_settings(METRIC_TARGET=target, SIZE_TARGET_KB=_cap_kb(plan, 3), **SCALES)
    trainer = FakeTrainer({plan[r].name: v for r, v in outcomes.items()})
    folder, met, rows, log = _stage_two(settings, prepared, trainer)

    assert trainer.calls == [plan[r].name for r in trained]          # smallest first
    assert plan[3].name not in trainer.calls                          # over size: never trained
    assert [r['candidate'] for r in rows if r['status'] == 'ok'] == \
        [plan[r].name for r in trained if outcomes[r] not in ('failed', 'diverged')]
    if winner is not None:
        best = plan[winner].name
        assert met is True
        assert f'{best} meets both targets: the smallest such model' in log
    else:
        scores = {plan[r].name: v for r, v in outcomes.items()}
        best = max(scores, key=scores.get)
        assert met is False
        assert f'No candidate met METRIC_TARGET={target}: the closest, {best} (' in log
        assert [r['candidate'] for r in rows if r['status'] == 'over-size'] == [plan[3].name]
    xx, yy = score_digits(_metrics(outcomes[[r for r in outcomes if plan[r].name == best][0]]))
    name = f'{xx}-{yy}' + ('' if winner is not None else '-MISS')   # a miss is marked
    assert folder == os.path.join(settings.FINAL_RESULT_DIR, name)
    assert sorted(os.listdir(settings.FINAL_RESULT_DIR)) == [name]
    files = set(os.listdir(folder))
    assert {'saved.pth', 'saved.onnx', 'evaluation_metrics.txt', 'params_used.py',
            'stage2_results.csv'} <= files
    text = open(os.path.join(folder, 'evaluation_metrics.txt')).read()
    assert f'ONNX file size: {os.path.getsize(os.path.join(folder, "saved.onnx")) / 1024:.2f} KB' in text
    assert ('does NOT meet' in text) is (winner is None)
    broken = [r for r in trained if outcomes[r] in ('failed', 'diverged')]
    missed = len(trained) - len(broken) - (winner is not None)
    assert (f"Candidates (4): {int(winner is not None)} met, {missed} trained and missed, "
            f"{3 - len(trained)} not needed (a smaller one met first), 1 over size") in log
    assert f"{len(broken)} failed" in log.split('Candidates (4):')[1]
    info = json.load(open(os.path.join(folder, 'result.json')))
    assert f"c{info['channel_scale']}-f{info['fc_scale']}" == best
    state = torch.load(os.path.join(folder, 'saved.pth'), weights_only=True)
    ss_model.AFNet(ss_model.generate_config(info['channel_scale'], info['fc_scale'], 1250)
                   ).load_state_dict(state)


def test_over_size_candidates_are_recorded_even_when_the_search_stops_early(plan, prepared,
                                                                          make_settings):
    settings = make_settings(METRIC_TARGET=90, SIZE_TARGET_KB=_cap_kb(plan, 3), **SCALES)
    _, met, rows, _ = _stage_two(settings, prepared, FakeTrainer({plan[0].name: 0.95}))
    assert met is True
    assert [r['candidate'] for r in rows if r['status'] == 'over-size'] == [plan[3].name]


def test_nothing_under_the_size_cap_trains_nothing(plan, prepared, make_settings):
    settings = make_settings(SIZE_TARGET_KB=plan[0].predicted_bytes / 1024 / 2, **SCALES)
    trainer = FakeTrainer({})
    folder, met, rows, log = _stage_two(settings, prepared, trainer)
    assert trainer.calls == [] and folder is None and met is False
    assert [r['status'] for r in rows] == ['over-size'] * 4
    assert 'none under the size cap trained successfully' in log


@pytest.mark.parametrize('outcomes', [{0: 0.5, 1: 0.93}, {0: 0.6, 1: 0.8, 2: 0.7}])
def test_a_rerun_does_not_retrain_finished_candidates(plan, prepared, make_settings, outcomes):
    settings = make_settings(METRIC_TARGET=90, SIZE_TARGET_KB=_cap_kb(plan, 3), **SCALES)
    first = FakeTrainer({plan[r].name: v for r, v in outcomes.items()})
    folder1, met1, rows1, _ = _stage_two(settings, prepared, first)
    again = FakeTrainer({})
    folder2, met2, rows2, log = _stage_two(settings, prepared, again)
    assert again.calls == []
    assert (folder2, met2) == (folder1, met1)
    assert [r['candidate'] for r in rows2] == [r['candidate'] for r in rows1]
    assert 'finished earlier: not retrained' in log and 'Resuming from' in log


def test_a_rerun_does_not_retrain_a_diverged_candidate(plan, prepared, make_settings):
    settings = make_settings(METRIC_TARGET=90, SIZE_TARGET_KB=_cap_kb(plan, 3), **SCALES)
    _stage_two(settings, prepared, FakeTrainer({plan[0].name: 'diverged'}))
    again = FakeTrainer({plan[0].name: 'diverged'})
    _, _, rows, _ = _stage_two(settings, prepared, again)
    assert again.calls == []
    assert [r['candidate'] for r in rows].count(plan[0].name) == 1


def test_fallback_best_respects_the_current_size_cap(plan, prepared, make_settings):
    big = make_settings(METRIC_TARGET=90, SIZE_TARGET_KB=1000, **SCALES)
    _stage_two(big, prepared, FakeTrainer({plan[3].name: 0.85}))   # largest is the best
    cap = _cap_kb(plan, 2)
    settings = make_settings(METRIC_TARGET=90, SIZE_TARGET_KB=cap, **SCALES)
    folder, met, _, _ = _stage_two(settings, prepared, FakeTrainer({}))
    assert met is False
    assert os.path.getsize(os.path.join(folder, 'saved.onnx')) <= cap * 1024


def test_with_quantize_int8_the_measured_int8_model_decides(plan, prepared, make_settings):
    settings = make_settings(QUANTIZE_INT8=True, CHANNEL_SCALES=(1, 2), FC_SCALES=(1,),
                             SIZE_TARGET_KB=100, METRIC_TARGET=100)
    trainer = FakeTrainer({}, default=0.95)            # float metrics: 95-95
    folder, met, rows, log = _stage_two(settings, prepared, trainer)
    assert trainer.calls == ['c1-f1', 'c2-f1'] and met is False
    float_sizes = {k.name: k.predicted_bytes for k in plan}
    for r in rows:
        assert r['status'] == 'ok'
        int8_file = os.path.join(settings.TEMP_DIR, r['candidate'], 'saved.int8.onnx')
        assert int(r['int8_bytes']) == os.path.getsize(int8_file) < float_sizes[r['candidate']]
        assert int(r['onnx_kb']) == -(-int(r['int8_bytes']) // 1024)
        measured = json.loads(r['int8_metrics'])['val']
        assert (int(r['xx']), int(r['yy'])) == score_digits(measured)
    assert 'saved.int8.onnx' in os.listdir(folder)
    text = open(os.path.join(folder, 'evaluation_metrics.txt')).read()
    int8_kb = f"{os.path.getsize(os.path.join(folder, 'saved.int8.onnx')) / 1024:.2f}"
    assert 'INT8 model' in text and f'ONNX file size: {int8_kb} KB' in text


# -------------------------------------------------------------- stage two's opening lines
def test_stage_two_opens_with_what_it_scales_and_warns_without_stage_one(make_settings):
    from public.search.stage_two import stage_two_intro
    text = '\n'.join(stage_two_intro(make_settings(LEARNING_RATE=0.003)))
    assert 'Stage two scales BudgetNet of public/ss_model.py: Stage-two model' in text
    assert 'LEARNING_RATE=0.003; targets: METRIC_TARGET=' in text and 'Scores: xx-yy' in text
    assert 'warning: no stage-one results in' in text


def test_stage_two_warns_when_it_does_not_follow_stage_ones_pick(make_settings):
    import pandas as pd
    from public.search.stage_two import stage_two_intro
    settings = make_settings(LEARNING_RATE=0.003)
    os.makedirs(settings.MODEL_SAVE_PATH)
    pd.DataFrame([dict(model='SepNet', best_lr='0.004', score=0.97, onnx_kb=13.28,
                       result='98-97')]).to_csv(
        os.path.join(settings.MODEL_SAVE_PATH, 'summary.csv'), index=False)
    text = '\n'.join(stage_two_intro(settings))
    assert "warning: stage one's best model is SepNet (lr 0.004, 98-97)" in text
    assert 'did best at 0.004 (python train_final.py LEARNING_RATE=0.004)' in text
    assert 'no stage-one results' not in text
