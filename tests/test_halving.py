"""SCHEDULER='halving': successive halving over each model's learning rates in stage one.

- The rungs (r, r*eta, ... NUM_EPOCHS) and who goes on: the best ceil(n/eta) of a rung's n
  trained candidates that can go on, by score (ties to the smaller rate); the others are
  'stopped' (not pruned, not in avoid.txt); ATML's rules hold inside a rung.
- One answer: any completion order, worker count and interruption gives the serial rows,
  avoid.txt, best folders and summary (canned trials: bookkeeping under test), as
  tests/test_serial_order.py checks for the grid.
- Real training: a trial trained to a rung's budget and continued from its checkpoint
  equals one trained straight to the larger budget; a real halving search trains fewer
  epochs than the grid and leaves a best folder.
"""
import copy
import os
import random

import pytest
import torch

from conftest import TinyNet, TinyNetB
from public.compress.export import export_onnx
from public.results.files import read_info
from public.core.interrupts import NoInterrupts
from public.results.table import ResultsTable, STAGE1_COLUMNS
from public.search.executor import SerialExecutor
from public.search.stage_one import rung_budgets, run_stage_one
from public.train.loop import STOP_BUDGET
from public.train.outcome import TrialResult, TrialStatus
from test_serial_order import _drive, _stage_one_state, cached_plan  # noqa: F401 (fixture)

HALVING = dict(SCHEDULER='halving', NUM_EPOCHS=12, HALVING_MIN_EPOCHS=1, HALVING_ETA=2,
               LR_MIN=0.001, LR_MAX=0.008, STEP=0.001, AVOID_PARAM=0.6, STAGE1_TARGET=97)
MODELS = [TinyNet, TinyNetB]
ORDERS = 25


def test_rung_budgets(make_settings):
    assert rung_budgets(make_settings(SCHEDULER='halving', NUM_EPOCHS=30)) == [3, 9, 27, 30]
    assert rung_budgets(make_settings(SCHEDULER='halving', NUM_EPOCHS=27)) == [3, 9, 27]
    assert rung_budgets(make_settings(SCHEDULER='halving', NUM_EPOCHS=3)) == [3]
    assert rung_budgets(make_settings(SCHEDULER='halving', NUM_EPOCHS=12, HALVING_MIN_EPOCHS=1,
                                      HALVING_ETA=2)) == [1, 2, 4, 8, 12]
    assert rung_budgets(make_settings(SCHEDULER='grid', NUM_EPOCHS=30)) == [30]


class HalvingTrainer:
    """Canned trials that know budgets: the score of a trial key at `epochs` epochs, an
    early stop at a scenario's epoch, or a divergence; a real exported TinyNet per key."""
    cache = {}

    def __init__(self, plan, num_epochs):
        self.plan, self.num_epochs = plan, num_epochs   # base key -> (kind, value, stop_at)
        self.calls = []

    def __call__(self, build_model, lr, data, settings, onnx_path, progress=True, desc='',
                 budget=0, checkpoint=None, **kw):
        base = desc.split('#')[0]
        kind, value, stop_at = self.plan[base]
        budget = budget or self.num_epochs
        self.calls.append((desc, budget))
        if kind == 'diverged' and budget >= stop_at:
            return TrialResult(status=TrialStatus.DIVERGED, stop_reason='diverged', epochs=stop_at)
        epochs = min(budget, stop_at)
        reason = ('early-stop' if epochs == stop_at < self.num_epochs else
                  'max-epochs' if epochs == self.num_epochs else STOP_BUDGET)
        # scores rise with the epochs, at a rate of the trial's own: ranks change by rung
        score = round(value + (0.99 - value) * (1 - 0.7 ** epochs) * (0.5 + (sum(map(ord, base)) % 5) / 10), 4)
        if base not in self.cache:
            torch.manual_seed(sum(map(ord, base)))
            model = build_model()
            size = export_onnx(model, onnx_path, data.in_channels, data.input_size,
                               settings.ONNX_OPSET)
            with open(onnx_path, 'rb') as f:
                self.cache[base] = (model.state_dict(), f.read(), size,
                                    sum(p.numel() for p in model.parameters()))
        state, onnx, size, params = self.cache[base]
        state = {k: v + epochs for k, v in state.items()}   # the weights of `epochs` epochs
        metrics = dict(f1=score, accuracy=score, precision=score, recall=min(1.0, score + 0.01))
        return TrialResult(status=TrialStatus.OK, stop_reason=reason, epochs=epochs,
                           best_epoch=epochs, val_metrics=metrics, test_metrics=dict(metrics),
                           onnx_bytes=size, onnx=onnx, latency_ms=0.1, params=params,
                           state_dict=copy.deepcopy(state), history=[(1, 0.5, 0.6, lr)])


def _plan(seed, num_epochs):
    rng = random.Random(seed)
    plan = {}
    for model in MODELS:
        for i in range(8):
            pick = rng.random()
            stop_at = rng.randint(2, num_epochs - 1) if rng.random() < 0.3 else num_epochs
            kind = 'diverged' if pick < 0.08 else 'ok'
            value = round(rng.uniform(0.3, 0.7), 4) if pick < 0.3 else round(rng.uniform(0.6, 0.9), 4)
            plan[f"{model.__name__}@{round(0.001 * (i + 1), 3)}"] = (kind, value, stop_at)
    return plan


def _run(settings, prepared, trainer, executor):
    run_stage_one(settings, prepared, MODELS, NoInterrupts(), log=lambda m: None,
                  progress=False, executor=executor, trainer=trainer)


@pytest.mark.parametrize('scenario', [1, 2])
def test_halving_any_completion_order_and_interruption_gives_the_serial_answer(
        scenario, prepared, make_settings, tmp_path):
    trainer = HalvingTrainer(_plan(scenario, HALVING['NUM_EPOCHS']), HALVING['NUM_EPOCHS'])
    serial = make_settings(MODEL_SAVE_PATH=str(tmp_path / 'serial'),
                           AVOID_FILE_PATH=str(tmp_path / 'serial-avoid.txt'),
                           TEMP_DIR=str(tmp_path / 'serial-temp'), **HALVING)
    _run(serial, prepared, trainer, SerialExecutor(prepared))
    expected = _stage_one_state(serial)
    statuses = {r['status'] for r in expected['rows']}
    assert {'stopped', 'promoted', 'ok'} <= statuses, statuses
    assert expected['folders']
    for order in range(ORDERS):
        rng = random.Random(7000 * scenario + order)
        settings = make_settings(MODEL_SAVE_PATH=str(tmp_path / f'o{order}'),
                                 AVOID_FILE_PATH=str(tmp_path / f'o{order}-avoid.txt'),
                                 TEMP_DIR=str(tmp_path / f'o{order}-temp'), **HALVING)

        def run(executor):
            executor.data = prepared
            return _run(settings, prepared, trainer, executor)
        _drive(run, rng)
        got = _stage_one_state(settings)
        for part in ('rows', 'avoid', 'folders', 'summary'):
            assert got[part] == expected[part], f"order {order}: {part} differ"


def test_promotions_follow_the_scores_and_stopped_trials_are_not_pruned(
        prepared, make_settings, tmp_path):
    # 8 rates of one model, eta 2, rungs 1, 2, 4, 8, 12 epochs: 8 -> 4 -> 2 -> 1 -> (12)
    plan = {f"TinyNet@{round(0.001 * (i + 1), 3)}": ('ok', v, 12)
            for i, v in enumerate([0.50, 0.62, 0.61, 0.70, 0.40, 0.66, 0.55, 0.30])}
    plan['TinyNet@0.005'] = ('diverged', 0.0, 1)            # prunes 0.003..0.007 after it
    trainer = HalvingTrainer(plan, 12)
    settings = make_settings(MODEL_SAVE_PATH=str(tmp_path / 'r'), TEMP_DIR=str(tmp_path / 't'),
                             AVOID_FILE_PATH=str(tmp_path / 'avoid.txt'),
                             **{**HALVING, 'STAGE1_TARGET': 100, 'AVOID_PARAM': 0.0})
    run_stage_one(settings, prepared, [TinyNet], NoInterrupts(), log=lambda m: None,
                  progress=False, executor=SerialExecutor(prepared), trainer=trainer)
    rows = ResultsTable(os.path.join(settings.MODEL_SAVE_PATH, 'results.csv'), STAGE1_COLUMNS).rows()
    rung1 = {r['lr']: r for r in rows if r['rung'] == '1'}
    # 0.006 and 0.007 are within 2*STEP of the diverged 0.005: never trained
    assert sorted(rung1) == ['0.001', '0.002', '0.003', '0.004', '0.005', '0.008']
    assert rung1['0.005']['status'] == 'diverged' and rung1['0.005']['pruned'] == 'True'
    able = [lr for lr, r in rung1.items() if r['status'] != 'diverged']
    ranked = sorted(able, key=lambda lr: (-float(rung1[lr]['score']), float(lr)))
    promoted = {lr for lr, r in rung1.items() if r['status'] == 'promoted'}
    assert promoted == set(ranked[:3]), 'ceil(6 trained / eta 2) = 3 go on'
    assert all(r['status'] == 'stopped' and r['pruned'] == 'False' for lr, r in rung1.items()
               if lr in able and lr not in promoted)
    avoid = open(settings.AVOID_FILE_PATH).read()
    assert '0.005' in avoid and not any(f"{lr} " in avoid for lr in able)
    assert all(r['rung_epochs'] == '1' and r['epochs'] == '1' for r in rung1.values()
               if r['status'] != 'diverged')
    last = [r for r in rows if r['status'] == 'ok']
    assert len(last) == 1 and last[0]['epochs'] == '12' and last[0]['stop_reason'] == 'max-epochs'
    # rung 2 trains 3 from epoch 1 to 2; ceil(3/2) = 2 go on to 4; then 1 goes straight to 12
    assert [r['rung_epochs'] for r in rows if r['rung'] == '2'] == ['2'] * 3
    assert [r['rung_epochs'] for r in rows if r['rung'] == '3'] == ['4'] * 2
    assert [(r['rung'], r['rung_epochs']) for r in rows if r['rung'] == '4'] == [('4', '12')]
    summary = open(os.path.join(settings.MODEL_SAVE_PATH, 'summary.csv')).read().splitlines()
    head, values = summary[0].split(','), summary[1].split(',')
    entry = dict(zip(head, values))
    assert entry['trials'] == '6' and entry['stopped'] == '4'     # 1 diverged, 1 ok
    assert int(entry['epochs_trained']) == sum(
        max(int(r['epochs']) for r in rows if r['lr'] == lr) for lr in rung1)
    assert os.listdir(os.path.join(settings.MODEL_SAVE_PATH, 'TinyNet')) == [
        f"{last[0]['xx']}-{last[0]['yy']}"]


def test_below_avoid_param_a_rung_result_is_stopped_and_a_finished_trial_pruned(
        prepared, make_settings, tmp_path):
    # 0.002 scores below AVOID_PARAM after its rung (1 epoch): stopped, not pruned, nothing in
    # avoid.txt (a rate judged after a few epochs is not a bad rate); 0.005 stops early below
    # AVOID_PARAM: finished, so pruned as in the grid, and 0.006 (within 2*STEP) never trains
    plan = {f"TinyNet@{round(0.001 * (i + 1), 3)}": ('ok', v, 12)
            for i, v in enumerate([0.80, 0.40, 0.85, 0.85, 0.30, 0.70])}
    plan['TinyNet@0.005'] = ('ok', 0.30, 1)
    trainer = HalvingTrainer(plan, 12)
    settings = make_settings(MODEL_SAVE_PATH=str(tmp_path / 'r'), TEMP_DIR=str(tmp_path / 't'),
                             AVOID_FILE_PATH=str(tmp_path / 'avoid.txt'),
                             **{**HALVING, 'LR_MAX': 0.006, 'AVOID_PARAM': 0.8,
                                'STAGE1_TARGET': 100})
    run_stage_one(settings, prepared, [TinyNet], NoInterrupts(), log=lambda m: None,
                  progress=False, executor=SerialExecutor(prepared), trainer=trainer)
    rows = ResultsTable(os.path.join(settings.MODEL_SAVE_PATH, 'results.csv'), STAGE1_COLUMNS).rows()
    rung1 = {r['lr']: r for r in rows if r['rung'] == '1'}
    assert sorted(rung1) == ['0.001', '0.002', '0.003', '0.004', '0.005']
    assert float(rung1['0.002']['score']) < 0.8
    assert (rung1['0.002']['status'], rung1['0.002']['pruned']) == ('stopped', 'False')
    assert (rung1['0.005']['status'], rung1['0.005']['pruned'],
            rung1['0.005']['stop_reason']) == ('ok', 'True', 'early-stop')
    avoid = open(settings.AVOID_FILE_PATH).read()
    assert '0.005 TinyNet' in avoid and '0.002' not in avoid


def test_stage1_target_at_a_rung_ends_the_model(prepared, make_settings, tmp_path):
    plan = {f"TinyNet@{round(0.001 * (i + 1), 3)}": ('ok', v, 12)
            for i, v in enumerate([0.5, 0.6, 0.985, 0.6])}
    trainer = HalvingTrainer(plan, 12)
    settings = make_settings(MODEL_SAVE_PATH=str(tmp_path / 'r'), TEMP_DIR=str(tmp_path / 't'),
                             AVOID_FILE_PATH=str(tmp_path / 'avoid.txt'),
                             **{**HALVING, 'LR_MAX': 0.004, 'AVOID_PARAM': 0.0})
    run_stage_one(settings, prepared, [TinyNet], NoInterrupts(), log=lambda m: None,
                  progress=False, executor=SerialExecutor(prepared), trainer=trainer)
    rows = ResultsTable(os.path.join(settings.MODEL_SAVE_PATH, 'results.csv'), STAGE1_COLUMNS).rows()
    # 0.003 reaches STAGE1_TARGET in rung 1: the model is done, 0.004 never trains, and the
    # two recorded before it stay stopped
    assert [(r['lr'], r['status']) for r in rows] == [
        ('0.001', 'stopped'), ('0.002', 'stopped'), ('0.003', 'ok')]
    assert rows[2]['rung'] == '1' and rows[2]['stop_reason'] == STOP_BUDGET
    assert [d for d, _ in trainer.calls] == ['TinyNet@0.001', 'TinyNet@0.002', 'TinyNet@0.003']


# ----------------------------------------------------------------------------- real training

def test_a_continued_rung_equals_one_run_to_the_larger_budget(prepared, make_settings, tmp_path):
    from public.train.loop import seed_everything, train_model
    settings = make_settings(NUM_EPOCHS=6, PATIENCE=50)

    def fresh():
        seed_everything(settings.SEED)
        return TinyNet()
    straight = train_model(fresh(), prepared.trial, 0.003, settings, prepared.device,
                           progress=False, budget=4)
    path = str(tmp_path / 'state.pt')
    first = train_model(fresh(), prepared.trial, 0.003, settings, prepared.device,
                        progress=False, checkpoint=path, budget=2)
    assert (first.epochs, first.stop_reason) == (2, STOP_BUDGET)
    again = train_model(fresh(), prepared.trial, 0.003, settings, prepared.device,
                        progress=False, checkpoint=path, budget=2)   # a rerun of the same rung
    assert (again.epochs, again.resumed_at, again.stop_reason) == (2, 2, STOP_BUDGET)
    assert all(torch.equal(again.state_dict[k], first.state_dict[k]) for k in first.state_dict)
    went_on = train_model(fresh(), prepared.trial, 0.003, settings, prepared.device,
                          progress=False, checkpoint=path, budget=4)
    assert (went_on.epochs, went_on.resumed_at, went_on.stop_reason) == (4, 2, STOP_BUDGET)
    assert went_on.history == straight.history
    assert all(torch.equal(went_on.state_dict[k], straight.state_dict[k])
               for k in straight.state_dict)
    full = train_model(fresh(), prepared.trial, 0.003, settings, prepared.device,
                       progress=False, checkpoint=path, budget=6)
    assert (full.epochs, full.stop_reason) == (6, 'max-epochs')


def test_a_real_halving_search_trains_fewer_epochs_than_the_grid(prepared, make_settings, tmp_path):
    common = dict(NUM_EPOCHS=4, LR_MIN=0.002, LR_MAX=0.005, STEP=0.001, STAGE1_TARGET=100,
                  AVOID_PARAM=0.0, PATIENCE=50, LATENCY_RUNS=2)
    found = {}
    for scheduler in ('grid', 'halving'):
        settings = make_settings(MODEL_SAVE_PATH=str(tmp_path / scheduler),
                                 TEMP_DIR=str(tmp_path / f'{scheduler}-temp'),
                                 AVOID_FILE_PATH=str(tmp_path / f'{scheduler}-avoid.txt'),
                                 SCHEDULER=scheduler, HALVING_MIN_EPOCHS=1, HALVING_ETA=2,
                                 **common)
        summary = run_stage_one(settings, prepared, [TinyNet], NoInterrupts(),
                                log=lambda m: None, progress=False)
        found[scheduler] = summary.iloc[0]
        assert os.path.isdir(summary.iloc[0]['folder'])
        left = os.path.join(settings.TEMP_DIR, 'checkpoints')
        assert not any(files for _, _, files in os.walk(left)), 'checkpoints left behind'
    assert found['grid']['epochs_trained'] == 4 * 4
    # 4 x 1 epoch, 2 of them to 2 epochs, 1 of those straight to 4: 4 + 2 + 2 = 8
    assert found['halving']['epochs_trained'] == 8
    assert found['halving']['trials'] == 4 and found['halving']['stopped'] == 3


# ----------------------------------------------------------------------------- stage two

def _stage_two_plan(seed, names):
    rng = random.Random(seed)
    plan = {}
    for name in names:
        stop_at = rng.randint(2, 11) if rng.random() < 0.25 else 12
        kind = 'diverged' if rng.random() < 0.1 else 'ok'
        plan[name] = (kind, round(rng.uniform(0.55, 0.85), 4), stop_at)
    return plan


@pytest.mark.parametrize('scenario', [1, 2, 3])
def test_stage_two_halving_any_completion_order_and_interruption_gives_the_serial_answer(
        scenario, prepared, make_settings, tmp_path, monkeypatch, cached_plan):
    import public.search.stage_two as scaling
    from test_serial_order import SCALES, stage_two_orders_give_the_serial_answer
    monkeypatch.setattr(scaling, 'plan_candidates', cached_plan)
    names = [f"c{c}-f1" for c in SCALES['CHANNEL_SCALES']]
    trainer = HalvingTrainer(_stage_two_plan(scenario, names), 12)
    expected = stage_two_orders_give_the_serial_answer(
        prepared, make_settings, tmp_path, trainer, 9000 * scenario, orders=ORDERS,
        **{**SCALES, 'METRIC_TARGET': 90}, SCHEDULER='halving', NUM_EPOCHS=12,
        HALVING_MIN_EPOCHS=1, HALVING_ETA=2)
    statuses = [r['status'] for r in expected['rows']]
    assert 'stopped' in statuses and 'promoted' in statuses, statuses


def test_stage_two_halving_keeps_the_smallest_that_meets(prepared, make_settings, tmp_path,
                                                         monkeypatch, cached_plan):
    import public.search.stage_two as scaling
    monkeypatch.setattr(scaling, 'plan_candidates', cached_plan)
    plan = {'c1-f1': ('ok', 0.80, 12), 'c2-f1': ('ok', 0.87, 12), 'c3-f1': ('ok', 0.70, 12),
            'c4-f1': ('ok', 0.60, 12), 'c5-f1': ('ok', 0.50, 12), 'c6-f1': ('ok', 0.40, 12)}
    trainer = HalvingTrainer(plan, 12)
    settings = make_settings(TEMP_DIR=str(tmp_path / 'temp'), FINAL_RESULT_DIR=str(tmp_path / 'f'),
                             CHANNEL_SCALES=(1, 2, 3, 4, 5, 6), FC_SCALES=(1,),
                             SIZE_TARGET_KB=1000, METRIC_TARGET=92, SCHEDULER='halving',
                             NUM_EPOCHS=12, HALVING_MIN_EPOCHS=1, HALVING_ETA=2)
    folder, met, rows = scaling.run_stage_two(settings, prepared, NoInterrupts(),
                                              log=lambda m: None, progress=False,
                                              trainer=trainer, executor=SerialExecutor(prepared))
    # rung 1 (1 epoch): 6 trained, the best 3 go on; rung 2 (2 epochs): the best 2 of 3;
    # rung 3 (4 epochs): c1 meets METRIC_TARGET=92 first (smallest first), so c2, larger,
    # is never trained on: the answer is c1, the smallest that meets
    assert [(r['candidate'], r['rung'], r['status']) for r in rows
            if r['status'] not in ('over-size', 'not-needed')] == [
        ('c1-f1', '1', 'promoted'), ('c2-f1', '1', 'promoted'), ('c3-f1', '1', 'promoted'),
        ('c4-f1', '1', 'stopped'), ('c5-f1', '1', 'stopped'), ('c6-f1', '1', 'stopped'),
        ('c1-f1', '2', 'promoted'), ('c2-f1', '2', 'promoted'), ('c3-f1', '2', 'stopped'),
        ('c1-f1', '3', 'ok')]
    assert float(rows[-1]['score']) >= 0.92 > float(rows[7]['score'])
    assert met and read_info(folder)['channel_scale'] == 1 and read_info(folder)['epochs'] == 4
    assert [d for d, _ in trainer.calls][-1] == 'c1-f1#r3'
    assert not any(files for _, _, files in os.walk(os.path.join(settings.TEMP_DIR, 'checkpoints')))
