"""Both stages on Ray: a private local instance with 2 workers (shared by this module's
tests), the same answers as the serial search, ATML's semantics under concurrency, and a
worker that dies. The multi-node test is in test_cluster.py."""
import os

import pytest
import torch

from conftest import TinyNet, TinyNetB
from public.core.interrupts import NoInterrupts
from public.results.table import ResultsTable, STAGE1_COLUMNS, STAGE2_COLUMNS, TIMING_COLUMNS
from public.search.stage_two import plan_candidates, run_stage_two
from public.search.stage_one import result_folders, run_stage_one
from stage_jobs import ScriptedTrainer

ray = pytest.importorskip('ray')


@pytest.fixture(scope='module')
def executor(prepared, tmp_path_factory):
    from public.search.executor import RayExecutor
    ex = RayExecutor(prepared, workers=2, address='local',
                     temp_dir=str(tmp_path_factory.mktemp('ray')), log=lambda m: None)
    yield ex
    ex.shutdown()


def _rows(path, columns):
    return ResultsTable(path, columns).rows()


def _stage_one(settings, prepared, models, executor=None, trainer=None):
    lines = []
    run_stage_one(settings, prepared, models, NoInterrupts(), log=lines.append, progress=False,
                  executor=executor, trainer=trainer)
    rows = _rows(os.path.join(settings.MODEL_SAVE_PATH, 'results.csv'), STAGE1_COLUMNS)
    return rows, '\n'.join(lines)


def _comparable(rows):
    return sorted(({k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows),
                  key=lambda r: (r['model'], float(r['lr'])))


def _best_state(settings, model):
    [folder] = result_folders(os.path.join(settings.MODEL_SAVE_PATH, model))
    return folder, torch.load(os.path.join(settings.MODEL_SAVE_PATH, model, folder, 'saved.pth'),
                              weights_only=True)


def test_parallel_stage_one_equals_the_serial_search(prepared, make_settings, tmp_path, executor):
    grid = dict(LR_MIN=0.002, LR_MAX=0.004, STEP=0.001)
    serial = make_settings(**grid)
    parallel = make_settings(MODEL_SAVE_PATH=str(tmp_path / 'parallel'), **grid)
    rows_s, _ = _stage_one(serial, prepared, [TinyNet, TinyNetB])
    rows_p, log = _stage_one(parallel, prepared, [TinyNet, TinyNetB], executor)
    assert len(rows_p) == 6
    assert _comparable(rows_p) == _comparable(rows_s)
    assert {r['node'] for r in rows_p} != {'local'} and len({r['node'] for r in rows_p}) == 1
    for model in ('TinyNet', 'TinyNetB'):
        (name_s, state_s), (name_p, state_p) = _best_state(serial, model), _best_state(parallel, model)
        assert name_s == name_p
        differ = {k: float((state_s[k].double() - state_p[k].double()).abs().max())
                  for k in state_s if not torch.equal(state_s[k], state_p[k])}
        assert differ == {}, differ


def test_a_result_prunes_queued_rates_and_a_running_trial_becomes_speculative(
        prepared, make_settings, tmp_path, executor):
    # 0.001 (fast, bad) prunes 0.002 and 0.003; 0.002 already runs beside it (4 s): the
    # serial search never trains it, so it is cancelled and decides nothing; 0.003 was
    # still queued: skipped. (An outcome that arrives first becomes a 'speculative' row:
    # test_serial_order.py.)
    (tmp_path / 'calls').mkdir()
    trainer = ScriptedTrainer(tmp_path / 'calls', scores={'TinyNet@0.001': 0.5},
                              delays={'TinyNet@0.002': 4.0})
    settings = make_settings(LR_MIN=0.001, LR_MAX=0.006, STEP=0.001, AVOID_PARAM=0.8)
    rows, log = _stage_one(settings, prepared, [TinyNet], executor, trainer)
    serial = [r for r in rows if r['status'] != 'speculative']
    assert [r['lr'] for r in serial] == ['0.001', '0.004', '0.005', '0.006']
    assert 'TinyNet@0.002' in trainer.calls() and len(rows) == 4
    assert 'avoid.txt has 0.002' not in log, 'a speculative trial prunes nothing'
    assert 'Speculative work: 0 trial(s)' in log and '1 running trial(s) cancelled' in log
    assert 'TinyNet lr=0.003: skipped (avoid.txt has 0.001 for TinyNet' in log
    assert 'TinyNet@0.003' not in trainer.calls()


def test_reaching_the_target_cancels_the_models_other_trials(prepared, make_settings, tmp_path,
                                                             executor):
    (tmp_path / 'calls').mkdir()
    trainer = ScriptedTrainer(tmp_path / 'calls', scores={'TinyNet@0.001': 0.99},
                              delays={'TinyNet@0.002': 30.0})
    settings = make_settings(LR_MIN=0.001, LR_MAX=0.004, STEP=0.001, STAGE1_TARGET=97)
    rows, log = _stage_one(settings, prepared, [TinyNet, TinyNetB], executor, trainer)
    assert [(r['model'], r['lr']) for r in rows if r['model'] == 'TinyNet'] == [('TinyNet', '0.001')]
    assert 'TinyNet@0.003' not in trainer.calls() and 'TinyNet@0.004' not in trainer.calls()
    assert len([r for r in rows if r['model'] == 'TinyNetB']) == 4   # the next model ran
    assert 'min4 99 >= STAGE1_TARGET=97; next model' in log


def test_a_worker_killed_twice_is_recorded_as_failed_and_the_search_goes_on(prepared,
                                                                           make_settings,
                                                                           tmp_path, executor):
    (tmp_path / 'calls').mkdir()
    trainer = ScriptedTrainer(tmp_path / 'calls', scores={}, kill={'TinyNet@0.002'})
    settings = make_settings(LR_MIN=0.002, LR_MAX=0.004, STEP=0.001)
    rows, log = _stage_one(settings, prepared, [TinyNet], executor, trainer)
    by_lr = {r['lr']: r for r in rows}
    assert sorted(by_lr) == ['0.002', '0.003', '0.004']
    assert by_lr['0.002']['status'] == 'failed' and by_lr['0.002']['attempts'] == '2'
    assert 'worker process died twice' in by_lr['0.002']['error']
    assert trainer.calls().count('TinyNet@0.002') == 2
    assert all(by_lr[lr]['status'] == 'ok' for lr in ('0.003', '0.004'))


# ----------------------------------------------------------------------------- stage two

SCALES = dict(CHANNEL_SCALES=(1, 2, 3), FC_SCALES=(1,), SIZE_TARGET_KB=1000, METRIC_TARGET=90)


def _stage_two(settings, prepared, trainer, executor):
    lines = []
    folder, met, rows = run_stage_two(settings, prepared, NoInterrupts(), log=lines.append,
                                      progress=False, trainer=trainer, executor=executor)
    return folder, met, rows, '\n'.join(lines)


def _names(settings, prepared):
    return [k.name for k in plan_candidates(settings, prepared.input_size, prepared.in_channels)]


def test_stage_two_a_larger_candidate_finishing_first_does_not_win(prepared, make_settings,
                                                                   tmp_path, executor):
    settings = make_settings(**SCALES)
    small, larger, largest = _names(settings, prepared)
    (tmp_path / 'calls').mkdir()
    trainer = ScriptedTrainer(tmp_path / 'calls', scores={small: 0.93, larger: 0.99},
                              delays={small: 1.0}, after={small: larger})
    folder, met, rows, log = _stage_two(settings, prepared, trainer, executor)
    assert met and f'{small} meets both targets: the smallest such model' in log
    assert os.path.basename(folder) == '93-93'
    assert largest not in trainer.calls(), 'nothing larger than a meeting candidate starts'
    assert [r['candidate'] for r in rows if r['status'] == 'ok'] == [small]
    assert [r['candidate'] for r in rows if r['status'] == 'speculative'] == [larger]


def test_stage_two_once_the_answer_is_certain_larger_running_candidates_are_cancelled(
        prepared, make_settings, tmp_path, executor):
    settings = make_settings(**SCALES)
    small, larger, _ = _names(settings, prepared)
    (tmp_path / 'calls').mkdir()
    trainer = ScriptedTrainer(tmp_path / 'calls', scores={small: 0.95}, delays={larger: 30.0})
    folder, met, rows, log = _stage_two(settings, prepared, trainer, executor)
    assert met and os.path.basename(folder) == '95-95'
    assert [r['candidate'] for r in rows if r['status'] == 'ok'] == [small]
    table = _rows(os.path.join(settings.TEMP_DIR, 'stage2_results.csv'), STAGE2_COLUMNS)
    # the cancelled larger candidate left no trained row: only its 'not-needed' account
    assert [r['status'] for r in table if r['candidate'] == larger] == ['not-needed']


def test_parallel_workers_report_their_epochs_to_the_driver(prepared, make_settings, tmp_path,
                                                            executor):
    from test_progress import _check_stage_one_events, _stage_one_events
    settings = make_settings(LR_MIN=0.002, LR_MAX=0.003, STEP=0.001, NUM_EPOCHS=2, PATIENCE=5)
    events, _ = _stage_one_events(settings, prepared, executor)
    _check_stage_one_events(events, ['TinyNet@0.002', 'TinyNet@0.003'], skipped=0, epochs=2)
