"""Tests of the contest figures as ATML records them (public/train/metrics.py's
contest_metrics / add_contest_score, the rows, evaluation_metrics.txt, per_subject.csv), of
SELECT_METRIC's contest values, and of stage two's latency and memory targets known before
training (public/search/stage_two.py), the latter with a fake timer.

The per-subject rules themselves are tested by hand-computed cases in tests/test_contest.py.
"""
import os

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import fbeta_score

import public.ss_model as ss_model
from conftest import TinyNet
from public.compress import export
from public.core.interrupts import NoInterrupts
from public.core.settings import SettingsError
from public.results.table import STAGE1_COLUMNS, STAGE2_COLUMNS, ResultsTable
from public.search import stage_two
from public.search.stage_one import result_folders, run_stage_one
from public.search.stage_two import LATENCY_BORDER, plan_candidates, run_stage_two
from public.search.trial import run_trial
from public.train.contest import normalised_contest_score
from public.train.metrics import (Scoring, add_contest_score, contest_metrics,
                                  predict_proba, selection_score)
from public.train.outcome import TrialStatus
from test_scaling import SCALES, FakeTrainer


# ----------------------------------------------------------------------------- the figures

def _reference(y, pred, subjects, beta, no_af):
    """Per-subject F-beta the long way: sklearn per subject, the no-AF rule by hand."""
    values = []
    for s in sorted(set(subjects)):
        m = subjects == s
        if y[m].sum():
            values.append(fbeta_score(y[m], pred[m], beta=beta, zero_division=0))
        elif no_af == 'contest':
            values.append(1.0)
        elif no_af == 'accuracy':
            values.append(float((pred[m] == 0).mean()))
    return values


@pytest.mark.parametrize('no_af', ['contest', 'accuracy', 'skip'])
@pytest.mark.parametrize('beta', [1.0, 2.0])
def test_contest_metrics_match_sklearn(beta, no_af):
    rng = np.random.default_rng(3)
    subjects = np.repeat(np.array(['a', 'b', 'c', 'd', 'e']), 40)
    y = (rng.random(200) < 0.4).astype(int)
    y[subjects == 'b'] = 0                       # a subject without AF
    y[subjects == 'c'] = 1                       # a subject without non-AF
    pred = np.where(rng.random(200) < 0.8, y, 1 - y)
    m = contest_metrics(y, pred, subjects, Scoring(beta, no_af, 0.75))
    assert m['fbeta'] == pytest.approx(fbeta_score(y, pred, beta=beta))
    per = _reference(y, pred, subjects, beta, no_af)
    assert m['subj_fbeta'] == pytest.approx(np.mean(per))
    assert m['gen'] == pytest.approx(np.mean(np.array(per) > 0.75))
    assert m['gen_subjects'] == len(per) == (4 if no_af == 'skip' else 5)


def test_contest_score_uses_the_contests_own_fbeta_and_the_measured_figures():
    m = dict(fbeta=0.8, subj_fbeta=0.9, gen=0.5)
    add_contest_score(m, Scoring(contest='iesd2024', latency='measured'), latency_ms=5.0,
                      size_bytes=100 * 1024)
    expected = (25 * 0.8 + 15 * 0.5 + 35 * 45 / 49.5 + 5 * 900 / 950) / 80
    assert m['contest'] == pytest.approx(expected)
    add_contest_score(m, Scoring(contest='tdc2022', latency_scale=2.0, latency='measured'),
                      5.0, 100 * 1024)
    assert m['contest'] == pytest.approx((100 * 0.8 + 20 * 190 / 199 + 20 * 156 / 251) / 140)
    multiclass = {'f1': 0.5}                   # no F-beta: a multi-class task, left blank
    assert 'contest' not in add_contest_score(multiclass, Scoring(latency='measured'), 5.0, 1024)


def test_the_default_contest_latency_is_macs_over_the_boards_rate_whatever_was_measured():
    # CONTEST_LATENCY='macs': L = 500,000 MACs / 100,000 per ms = 5 ms, the same figure as
    # the measured 5 ms above; the measured latency (any value) and LATENCY_SCALE play no part
    expected = (25 * 0.8 + 15 * 0.5 + 35 * 45 / 49.5 + 5 * 900 / 950) / 80
    for measured in (0.04, 0.9, 37.0, None):
        m = dict(fbeta=0.8, subj_fbeta=0.9, gen=0.5)
        add_contest_score(m, Scoring(contest='iesd2024', latency_scale=7.0), measured,
                          100 * 1024, macs=500_000)
        assert m['contest'] == pytest.approx(expected)
    m = dict(fbeta=0.8, subj_fbeta=0.9, gen=0.5)
    add_contest_score(m, Scoring(contest='iesd2024', macs_per_ms=50_000), 0.04, 100 * 1024,
                      macs=500_000)                                        # 10 ms
    assert m['contest'] == pytest.approx((25 * 0.8 + 15 * 0.5 + 35 * 40 / 49.5
                                          + 5 * 900 / 950) / 80)
    no_macs = dict(fbeta=0.8, subj_fbeta=0.9, gen=0.5)     # no graph figures: no score
    assert 'contest' not in add_contest_score(no_macs, Scoring(), 5.0, 1024)


@pytest.mark.parametrize('metric,value', [('fbeta', 0.7), ('subj_fbeta', 0.6), ('gen', 0.5),
                                          ('contest', 0.4)])
def test_each_contest_figure_is_a_selection_score(metric, value):
    metrics = dict(f1=0.9, accuracy=0.9, precision=0.9, recall=0.9, fbeta=0.7,
                   subj_fbeta=0.6, gen=0.5, contest=0.4)
    assert selection_score(metrics, metric) == value
    assert selection_score({'f1': 0.9}, metric) == 0.0      # an older row: never wins


@pytest.mark.parametrize('metric', ['fbeta', 'subj_fbeta', 'gen', 'contest'])
def test_contest_metrics_need_a_binary_task(make_settings, metric):
    with pytest.raises(SettingsError, match=rf"SELECT_METRIC='{metric}' scores AF detection, "
                                            r"so it needs a binary task .*CLASSES=\('N', 'A', 'O'\)"):
        make_settings(SELECT_METRIC=metric, CLASSES=('N', 'A', 'O'))


def test_a_real_trials_figures_match_sklearn(prepared, make_settings, tmp_path):
    settings = make_settings(NUM_EPOCHS=1, LATENCY_RUNS=20)
    config = ss_model.generate_config(1, 1, 1250)
    result = run_trial(lambda: ss_model.AFNet(config), 0.003, prepared, settings,
                       str(tmp_path / 'trial.onnx'), progress=False)
    assert result.status == TrialStatus.OK, result.error
    pred = predict_proba(result.model, prepared.x_test, prepared.device).argmax(1)
    m = result.test_metrics
    assert m['fbeta'] == pytest.approx(fbeta_score(prepared.y_test, pred, beta=2, zero_division=0))
    subjects = np.asarray(prepared.test_subjects)
    assert m['subj_fbeta'] == pytest.approx(np.mean(_reference(
        np.asarray(prepared.y_test), pred, subjects, 2.0, 'contest')))
    assert result.graph['macs'] > 0 and result.graph['peak_activation_bytes'] > 0
    # the contest's latency is the graph's MACs over MACS_PER_MS, not the measured figure
    assert m['contest'] == pytest.approx(normalised_contest_score(
        'iesd2024', m['subj_fbeta'], m['gen'], result.graph['macs'] / settings.MACS_PER_MS,
        result.onnx_bytes / 1024))
    rows = [r for r in result.per_subject if r['split'] == 'test']
    assert all('fbeta' in r for r in rows) and len(rows) == len(set(subjects))


# ----------------------------------------------------------------------------- stage one

def test_stage_one_selects_by_fbeta_and_records_the_contest_figures(prepared, make_settings):
    settings = make_settings(SELECT_METRIC='fbeta', LR_MIN=0.002, LR_MAX=0.004, STEP=0.001,
                             LATENCY_RUNS=20)
    summary = run_stage_one(settings, prepared, [TinyNet], NoInterrupts(), log=lambda *a: None,
                            progress=False)
    rows = ResultsTable(os.path.join(settings.MODEL_SAVE_PATH, 'results.csv'),
                        STAGE1_COLUMNS).rows()
    assert len(rows) == 3
    for r in rows:
        assert float(r['score']) == pytest.approx(float(r['val_fbeta']), abs=1e-6)
        for col in ('test_fbeta', 'val_subj_fbeta', 'test_gen', 'val_contest', 'macs',
                    'param_bytes', 'peak_act_bytes', 'peak_act_int8_bytes'):
            assert r[col] != '', col
        assert int(r['macs']) > 0 and int(r['peak_act_int8_bytes']) < int(r['peak_act_bytes'])
    best = max(rows, key=lambda r: (float(r['val_fbeta']), -float(r['lr'])))
    model_dir = os.path.join(settings.MODEL_SAVE_PATH, 'TinyNet')
    assert result_folders(model_dir) == [f"{best['xx']}-{best['yy']}"]
    folder = os.path.join(model_dir, result_folders(model_dir)[0])
    text = open(os.path.join(folder, 'evaluation_metrics.txt')).read()
    assert 'ONNX file size: ' in text                              # the original's lines stay
    assert f"F-beta (beta=2): {float(best['val_fbeta']):.4f}" in text
    assert 'Subject-averaged F-beta: ' in text and 'Subjects with F-beta > 0.9: ' in text
    assert 'Contest score (iesd2024, normalised): ' in text and ' MACs, ' in text
    latency = int(best['macs']) / settings.MACS_PER_MS
    assert (f"(latency {latency:.3f} ms = {best['macs']} MACs / MACS_PER_MS=100000)"
            in text)
    assert 'fbeta' in pd.read_csv(os.path.join(folder, 'per_subject.csv')).columns
    assert {'val_fbeta', 'val_subj_fbeta', 'val_gen', 'macs'} <= set(summary.columns)
    assert len(summary.columns) <= 100


def test_an_older_table_without_the_new_columns_still_reads(tmp_path):
    path = str(tmp_path / 'results.csv')
    old = [c for c in STAGE1_COLUMNS if c not in ('val_fbeta', 'test_fbeta', 'macs')]
    ResultsTable(path, old).append({'model': 'TinyNet', 'lr': '0.002', 'score': '0.5'})
    table = ResultsTable(path, STAGE1_COLUMNS)
    assert table.rows()[0]['model'] == 'TinyNet'
    table.append({'model': 'TinyNet', 'lr': '0.003', 'val_fbeta': 0.5, 'macs': 10})
    rows = table.rows()
    assert [r['lr'] for r in rows] == ['0.002', '0.003'] and rows[0]['val_fbeta'] == ''
    assert rows[1]['macs'] == '10'


# ----------------------------------------------------------------------------- stage two

class FakeTimer:
    """Stands in for onnxruntime timing: the figures of `sequence`, one per call, or
    per_path(path) (set by the test)."""

    def __init__(self, sequence=None):
        self.sequence, self.calls = list(sequence or []), []

    def __call__(self, path, runs=200, warmup=10):
        self.calls.append(path)
        if self.sequence:
            return self.sequence.pop(0)
        return self.per_path(path)


def _stage_two(settings, prepared, trainer):
    lines = []
    run_stage_two(settings, prepared, NoInterrupts(), log=lines.append, progress=False,
                  trainer=trainer)
    table = ResultsTable(os.path.join(settings.TEMP_DIR, 'stage2_results.csv'), STAGE2_COLUMNS)
    return table.rows(), '\n'.join(lines)


def test_candidates_over_the_latency_target_are_never_trained(monkeypatch, prepared,
                                                              make_settings):
    plan = plan_candidates(make_settings(**SCALES), 1250, 1)     # smallest first
    fake = dict(zip((k.predicted_bytes for k in plan), (1.0, 2.0, 8.0, 16.0)))
    timer = FakeTimer()
    timer.per_path = lambda path: fake[os.path.getsize(path)]
    monkeypatch.setattr(export, 'onnx_latency_ms', timer)
    target = 4.0                 # admits the two fastest, far from the borderline
    assert all(abs(v - target) > LATENCY_BORDER * target for v in fake.values())
    settings = make_settings(LATENCY_TARGET_MS=target, SIZE_TARGET_KB=1000, METRIC_TARGET=99,
                             **SCALES)
    trainer = FakeTrainer({}, default=0.5)           # nothing meets: every feasible one runs
    rows, log = _stage_two(settings, prepared, trainer)
    assert trainer.calls == [plan[0].name, plan[1].name]
    over = {r['candidate'] for r in rows if r['status'] == TrialStatus.OVER_LATENCY}
    assert over == {plan[2].name, plan[3].name}
    assert "8.000 ms" in log and 'over latency target: never trained' in log
    assert all(r['probe_latency_ms'] != '' for r in rows)


def test_fastest_first_orders_the_plan_by_probe_latency(monkeypatch, make_settings):
    slow_small = {'c1-f1': 5.0, 'c1-f2': 4.0, 'c2-f1': 3.0, 'c2-f2': 1.0}
    sizes = {}

    def timer(path, runs=200, warmup=10):
        return slow_small[sizes[os.path.getsize(path)]]
    smallest = plan_candidates(make_settings(**SCALES), 1250, 1)
    sizes.update({k.predicted_bytes: k.name for k in smallest})
    monkeypatch.setattr(export, 'onnx_latency_ms', timer)
    fastest = plan_candidates(make_settings(CANDIDATE_ORDER='fastest', **SCALES), 1250, 1)
    assert [k.name for k in fastest] == ['c2-f2', 'c2-f1', 'c1-f2', 'c1-f1']
    assert [k.latency_ms for k in smallest] == [None] * 4       # not measured unless asked


@pytest.mark.parametrize('sequence,expected,calls', [
    ([2.0], 2.0, 1),                              # far over: one measurement decides
    ([0.5], 0.5, 1),                              # far under
    ([1.05, 0.95, 0.97, 1.2, 0.96], 0.97, 5),     # borderline: the median of five
    ([0.9, 1.1, 1.12, 1.3, 0.8], 1.1, 5),
])
def test_a_borderline_latency_is_measured_again(monkeypatch, make_settings, tmp_path,
                                                sequence, expected, calls):
    timer = FakeTimer(sequence=sequence)
    monkeypatch.setattr(export, 'onnx_latency_ms', timer)
    settings = make_settings(LATENCY_TARGET_MS=1.0)
    assert stage_two.probe_latency_ms('probe.onnx', settings) == expected
    assert len(timer.calls) == calls


def test_candidates_over_the_memory_target_are_never_trained(prepared, make_settings):
    plan = plan_candidates(make_settings(**SCALES), 1250, 1)
    peaks = sorted(k.peak_act_bytes for k in plan)
    assert peaks[0] < peaks[-1]
    limit_kb = (peaks[0] + peaks[-1]) / 2 / 1024
    settings = make_settings(RAM_TARGET_KB=limit_kb, SIZE_TARGET_KB=1000, METRIC_TARGET=99,
                             **SCALES)
    trainer = FakeTrainer({}, default=0.5)
    rows, log = _stage_two(settings, prepared, trainer)
    low = [k.name for k in plan if k.peak_act_bytes <= limit_kb * 1024]
    assert trainer.calls == low
    assert {r['candidate'] for r in rows if r['status'] == TrialStatus.OVER_RAM} == \
        {k.name for k in plan} - set(low)
