"""Tests of public/search/stage_one.py: the learning-rate grid, avoid.txt pruning, the stage-one search.

The search tests run the real run_stage_one in-process on the small data set with TinyNet
(a real, very small model) and 1 epoch per trial, so they check the bookkeeping (which
trials run, what is recorded, resume) at a fraction of a second per trial.
"""
import os
import re

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TinyNet, TinyNetB
from public.core.interrupts import NoInterrupts
from public.results.table import ResultsTable, STAGE1_COLUMNS
from public.core.errors import AvoidFileError
from public.search.avoid import AvoidList, learning_rate_candidates
from public.search.stage_one import (next_step_lines, recommended_pick, result_folders,
                                     run_stage_one)
from public.test import score_digits

# ----------------------------------------------------------------------------- grid


@pytest.mark.parametrize('lr_min,lr_max,step,expected', [
    (0.0015, 0.0050, 0.0005, [0.0015, 0.002, 0.0025, 0.003, 0.0035, 0.004, 0.0045, 0.005]),
    (0.1, 0.3, 0.1, [0.1, 0.2, 0.3]),                       # 0.1 + 0.2 != 0.3 in floats
    (0.001, 0.001, 0.0005, [0.001]),
    (0.001, 0.0024, 0.0005, [0.001, 0.0015, 0.002]),         # never past LR_MAX
    (0.0001, 0.0007, 0.0001, [0.0001, 0.0002, 0.0003, 0.0004, 0.0005, 0.0006, 0.0007]),
    (1e-5, 3e-5, 1e-5, [1e-5, 2e-5, 3e-5]),
    (0.003, 0.005, 0.01, [0.003]),
])
def test_learning_rate_candidates_are_exact(lr_min, lr_max, step, expected):
    got = learning_rate_candidates(lr_min, lr_max, step)
    assert got == expected
    assert [repr(v) for v in got] == [repr(v) for v in expected]


def test_original_grid_has_exactly_eight_values():
    assert len(learning_rate_candidates(0.0015, 0.0050, 0.0005)) == 8


@pytest.mark.parametrize('args,message', [
    ((0.001, 0.002, 0), 'STEP must be > 0, got STEP=0'),
    ((0.001, 0.002, -0.0005), 'STEP must be > 0'),
    ((0.003, 0.002, 0.0005), 'LR_MIN must be <= LR_MAX, got LR_MIN=0.003, LR_MAX=0.002'),
])
def test_learning_rate_candidates_reject_bad_grids(args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        learning_rate_candidates(*args)


# ----------------------------------------------------------------------------- avoid.txt

def _avoid(tmp_path, text, step=0.0005):
    path = tmp_path / 'avoid.txt'
    path.write_text(text)
    return AvoidList(str(path), step)


# (avoid.txt, lr, model, expected entry or None); STEP = 0.0005, so the reach is 0.001.
PRUNING = [
    ('0.0025 AFNet\n', 0.0025, 'AFNet', (0.0025, 'AFNet')),
    ('0.0025 AFNet\n', 0.0015, 'AFNet', (0.0025, 'AFNet')),           # -2*STEP: inclusive
    ('0.0025 AFNet\n', 0.0035, 'AFNet', (0.0025, 'AFNet')),           # +2*STEP: inclusive
    ('0.0025 AFNet\n', 0.0014, 'AFNet', None),
    ('0.0025 AFNet\n', 0.0036, 'AFNet', None),
    ('0.0025 AFNet\n', 0.0025, 'ShuffleNetV2', None),                 # scoped to its model
    ('0.0025\n', 0.0025, 'ShuffleNetV2', (0.0025, None)),             # bare: every model
    ('0.0025\n', 0.0035, 'OptimizedAFNet', (0.0025, None)),
    ('0.0025\n', 0.0036, 'OptimizedAFNet', None),
    ('# 0.0025\n', 0.0025, 'AFNet', None),                            # a comment
    ('0.0025  # AFNet was bad here\n', 0.003, 'ShuffleNetV2', (0.0025, None)),
    ('\n   \n0.005 AFNet # note\n', 0.004, 'AFNet', (0.005, 'AFNet')),
    ('0.0025 AFNet\n0.0045\n', 0.0042, 'AFNet', (0.0045, None)),
    ('1e-3\n', 0.002, 'AFNet', (0.001, None)),
]


@pytest.mark.parametrize('text,lr,model,expected', PRUNING)
def test_pruning_rule(tmp_path, text, lr, model, expected):
    assert _avoid(tmp_path, text).pruned_by(lr, model) == expected


def test_missing_avoid_file_prunes_nothing(tmp_path):
    avoid = AvoidList(str(tmp_path / 'absent.txt'), 0.0005)
    assert avoid.entries == [] and avoid.pruned_by(0.003, 'AFNet') is None


@pytest.mark.parametrize('line', ['abc', '0.0025 AFNet extra', '-0.001', '0', 'nan', 'inf',
                                  '0.0025 Bad-Name', '0,0025', 'AFNet 0.0025'])
def test_malformed_avoid_line_names_file_and_line(tmp_path, line):
    with pytest.raises(AvoidFileError) as info:
        _avoid(tmp_path, f'# header\n0.001\n{line}\n')
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'avoid.txt'}: line 3: {line.strip()!r} is not a "
                              f"valid entry")
    assert "'0.0025 AFNet'" in message


def test_add_appends_a_scoped_entry_that_a_rerun_sees(tmp_path):
    avoid = _avoid(tmp_path, '# user notes\n0.0045\n')
    avoid.add(0.002, 'TinyNet', 'worst val metric 0.5 < AVOID_PARAM 0.8')
    assert avoid.pruned_by(0.001, 'TinyNet') == (0.002, 'TinyNet')
    again = AvoidList(avoid.path, 0.0005)
    assert [(e[0], e[1]) for e in again.entries] == [(0.0045, None), (0.002, 'TinyNet')]
    assert again.contains(0.002, 'TinyNet') and not again.contains(0.002, 'Other')
    assert (tmp_path / 'avoid.txt').read_text().splitlines()[-1].startswith('0.002 TinyNet')


def test_remove_search_lines_keeps_the_users_lines(tmp_path):
    text = ('# notes\n0.0045\n0.002 TinyNet  # atml:0123456789 min4 0.5 < 0.8\n'
            '0.004  # by hand\n0.003 AFNet\n')
    avoid = _avoid(tmp_path, text)
    avoid.remove_search_lines()
    assert (tmp_path / 'avoid.txt').read_text() == '# notes\n0.0045\n0.004  # by hand\n0.003 AFNet\n'
    assert [(e[0], e[1]) for e in avoid.entries] == [(0.0045, None), (0.004, None), (0.003, 'AFNet')]


def test_search_lines_apply_only_under_their_settings_key(tmp_path):
    avoid = _avoid(tmp_path, '0.009 TinyNet  # by hand\n')
    avoid.add(0.002, 'TinyNet', 'diverged', key='aaaaaaaaaa')
    again = AvoidList(avoid.path, 0.0005)
    assert again.pruned_by(0.002, 'TinyNet', 'aaaaaaaaaa') == (0.002, 'TinyNet')
    assert again.pruned_by(0.0015, 'TinyNet', 'bbbbbbbbbb') is None     # other settings
    assert again.pruned_by(0.0095, 'TinyNet', 'bbbbbbbbbb') == (0.009, 'TinyNet')  # the user's line


@pytest.mark.parametrize('user_text', ['0.0045', '# my notes'])
def test_add_after_a_last_line_without_newline(tmp_path, user_text):
    avoid = _avoid(tmp_path, user_text)              # hand-edited file, no final newline
    avoid.add(0.002, 'TinyNet')
    again = AvoidList(avoid.path, 0.0005)            # what the next run reads
    assert again.pruned_by(0.002, 'TinyNet') == (0.002, 'TinyNet')


# ----------------------------------------------------------------------------- stage one

def _search(settings, prepared, models=(TinyNet,)):
    lines = []
    summary = run_stage_one(settings, prepared, list(models), NoInterrupts(), log=lines.append,
                            progress=False)
    return summary, '\n'.join(lines)


def _rows(settings):
    return ResultsTable(os.path.join(settings.MODEL_SAVE_PATH, 'results.csv'), STAGE1_COLUMNS).rows()


GRID = dict(LR_MIN=0.001, LR_MAX=0.004, STEP=0.0005)     # 7 candidates


def test_pruning_skips_neighbours_of_a_bad_rate_within_its_model(prepared, make_settings):
    settings = make_settings(AVOID_PARAM=1.0, **GRID)      # every trial is below 1.0: pruned
    summary, log = _search(settings, prepared, [TinyNet, TinyNetB])
    rows = _rows(settings)
    for model in ('TinyNet', 'TinyNetB'):
        assert [r['lr'] for r in rows if r['model'] == model] == ['0.001', '0.0025', '0.004']
        assert all(r['pruned'] == 'True' for r in rows if r['model'] == model)
    entries = AvoidList(settings.AVOID_FILE_PATH, settings.STEP).entries
    assert sorted((e[0], e[1]) for e in entries) == sorted(
        (lr, m) for m in ('TinyNet', 'TinyNetB') for lr in (0.001, 0.0025, 0.004))
    assert 'lr=0.0015: skipped (avoid.txt has 0.001 for TinyNet, within 2*STEP)' in log
    assert list(summary['pruned']) == [3, 3]       # trained, below AVOID_PARAM
    assert list(summary['skipped']) == [4, 4]      # never trained: avoid.txt


def test_a_users_bare_line_prunes_every_model(prepared, make_settings, tmp_path):
    (tmp_path / 'avoid.txt').write_text('# by hand\n0.0025\n')
    settings = make_settings(AVOID_PARAM=0.0, **GRID)
    _, log = _search(settings, prepared, [TinyNet, TinyNetB])
    rows = _rows(settings)
    for model in ('TinyNet', 'TinyNetB'):
        assert [r['lr'] for r in rows if r['model'] == model] == ['0.001', '0.004']
    assert 'skipped (avoid.txt has 0.0025 for every model' in log
    assert (tmp_path / 'avoid.txt').read_text() == '# by hand\n0.0025\n'


@pytest.mark.parametrize('target,trials', [(0, 1), (100, 3)])
def test_stage1_target_ends_a_models_search(prepared, make_settings, target, trials):
    settings = make_settings(STAGE1_TARGET=target, LR_MIN=0.002, LR_MAX=0.004, STEP=0.001)
    _, log = _search(settings, prepared, [TinyNet, TinyNetB])
    rows = _rows(settings)
    assert all(int(r['yy']) < 100 for r in rows), 'a perfect score would end the search early'
    for model in ('TinyNet', 'TinyNetB'):
        assert len([r for r in rows if r['model'] == model]) == trials
    if target == 0:
        assert log.count('>= STAGE1_TARGET=0; next model') == 2


class BrokenInit(torch.nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        raise RuntimeError('this model does not build')


class BrokenForward(TinyNet):
    def forward(self, x):
        raise RuntimeError('forward is broken')


def test_a_model_that_fails_is_recorded_and_the_search_goes_on(prepared, make_settings):
    settings = make_settings(LR_MIN=0.002, LR_MAX=0.003, STEP=0.001)
    summary, log = _search(settings, prepared, [BrokenInit, BrokenForward, TinyNet])
    rows = _rows(settings)
    by_model = {m: [r for r in rows if r['model'] == m] for m in ('BrokenInit', 'BrokenForward', 'TinyNet')}
    for name, message in (('BrokenInit', 'this model does not build'),
                          ('BrokenForward', 'forward is broken')):
        [row] = by_model[name]                      # does not build/run: other rates skipped
        assert row['status'] == 'failed' and message in row['error']
        error_txt = open(os.path.join(settings.MODEL_SAVE_PATH, name, 'error.txt')).read()
        assert 'Traceback' in error_txt and message in error_txt
        assert result_folders(os.path.join(settings.MODEL_SAVE_PATH, name)) == []
    assert [r['status'] for r in by_model['TinyNet']] == ['ok', 'ok']
    assert 'FAILED' in log and 'going on' in log
    summary = summary.set_index('model')
    assert summary.loc['BrokenInit', 'failed'] == 1 and summary.loc['TinyNet', 'failed'] == 0
    assert isinstance(summary.loc['TinyNet', 'result'], str)


class NoisyNet(TinyNet):
    """Trains, but its outputs are random, so the exported file cannot match PyTorch."""

    def forward(self, x):
        out = super().forward(x)
        return out + torch.randn_like(out)


def test_a_trial_that_fails_export_is_recorded_and_the_next_rate_runs(prepared, make_settings):
    settings = make_settings(LR_MIN=0.002, LR_MAX=0.003, STEP=0.001)
    _, log = _search(settings, prepared, [NoisyNet, TinyNet])
    rows = _rows(settings)
    noisy = [r for r in rows if r['model'] == 'NoisyNet']
    assert [(r['lr'], r['status'], r['epochs']) for r in noisy] == [('0.002', 'failed', '1'),
                                                                   ('0.003', 'failed', '1')]
    assert all('ExportError' in r['error'] and 'differs from PyTorch' in r['error'] for r in noisy)
    assert [r['status'] for r in rows if r['model'] == 'TinyNet'] == ['ok', 'ok']
    assert result_folders(os.path.join(settings.MODEL_SAVE_PATH, 'NoisyNet')) == []


class NanNet(TinyNet):
    """Its loss is NaN from the first batch: every trial diverges."""

    def forward(self, x):
        return super().forward(x) * float('nan')


def test_a_diverged_trial_prunes_its_rate_and_is_not_retried(prepared, make_settings):
    settings = make_settings(**GRID)
    _search(settings, prepared, [NanNet])
    rows = _rows(settings)
    assert [(r['lr'], r['status']) for r in rows] == [('0.001', 'diverged'),
                                                     ('0.0025', 'diverged'), ('0.004', 'diverged')]
    assert sorted(e[0] for e in AvoidList(settings.AVOID_FILE_PATH, settings.STEP).entries) == \
        [0.001, 0.0025, 0.004]
    _search(settings, prepared, [NanNet])
    assert len(_rows(settings)) == 3


def test_stage_one_without_a_test_folder_records_validation_only(make_settings):
    from public.data.prepare import prepare_data
    settings = make_settings(TEST_DIR='')
    data = prepare_data(settings, progress=False)
    summary, _ = _search(settings, data)
    [row] = _rows(settings)
    assert row['status'] == 'ok' and row['val_f1'] != '' and row['test_f1'] == ''
    assert 'test_f1' not in summary.columns and 'val_f1' in summary.columns
    [folder] = result_folders(os.path.join(settings.MODEL_SAVE_PATH, 'TinyNet'))
    text = open(os.path.join(settings.MODEL_SAVE_PATH, 'TinyNet', folder,
                             'evaluation_metrics.txt')).read()
    assert 'F1 Score' in text and 'test split' not in text


@pytest.mark.parametrize('select_on', ['val', 'test'])
def test_select_on_decides_digits_and_best_folder(prepared, make_settings, select_on):
    settings = make_settings(SELECT_ON=select_on, LR_MIN=0.002, LR_MAX=0.004, STEP=0.001)
    _search(settings, prepared)
    rows = _rows(settings)
    for r in rows:
        metrics = {m: float(r[f'{select_on}_{m}']) for m in ('f1', 'accuracy', 'precision', 'recall')}
        assert (int(r['xx']), int(r['yy'])) == score_digits(metrics)
        assert r['select_on'] == select_on
        assert r['test_f1'] != '' and r['val_f1'] != ''
    best = max(rows, key=lambda r: (int(r['yy']), int(r['xx'])))    # first of equals
    model_dir = os.path.join(settings.MODEL_SAVE_PATH, 'TinyNet')
    assert result_folders(model_dir) == [f"{best['xx']}-{best['yy']}"]
    text = open(os.path.join(model_dir, result_folders(model_dir)[0], 'evaluation_metrics.txt')).read()
    assert f"Learning Rate: {float(best['lr'])}" in text
    assert f'SELECT_ON={select_on!r}' in text
    assert not [e for e in os.listdir(model_dir) if e.startswith('.')]


def test_a_rerun_resumes_without_repeating_finished_trials(prepared, make_settings):
    settings = make_settings(AVOID_PARAM=1.0, **GRID)
    _search(settings, prepared)
    first = _rows(settings)
    avoid_text = open(settings.AVOID_FILE_PATH).read()
    _, log = _search(settings, prepared)
    assert _rows(settings) == first
    assert open(settings.AVOID_FILE_PATH).read() == avoid_text
    assert 'Resuming from' in log and '3 finished trial(s) will not be repeated' in log
    assert 'lr=0.001: finished in an earlier run; skipped' in log


def test_resume_restores_avoid_entries_a_kill_lost(prepared, make_settings):
    settings = make_settings(AVOID_PARAM=1.0, **GRID)
    _search(settings, prepared)
    first = _rows(settings)
    os.remove(settings.AVOID_FILE_PATH)               # killed after the row, before avoid.txt
    _search(settings, prepared)
    assert _rows(settings) == first
    entries = AvoidList(settings.AVOID_FILE_PATH, settings.STEP).entries
    assert sorted(e[0] for e in entries) == [0.001, 0.0025, 0.004]
    assert 'restored from results.csv' in open(settings.AVOID_FILE_PATH).read()


def test_changed_training_settings_do_not_reuse_old_trials(prepared, make_settings):
    _search(make_settings(LR_MIN=0.002, LR_MAX=0.003, STEP=0.001), prepared)
    settings = make_settings(LR_MIN=0.002, LR_MAX=0.003, STEP=0.001, NUM_EPOCHS=2)
    _, log = _search(settings, prepared)
    rows = _rows(settings)
    assert [(r['lr'], r['epochs']) for r in rows] == [('0.002', '1'), ('0.003', '1'),
                                                      ('0.002', '2'), ('0.003', '2')]
    assert '2 row(s) from other settings are kept but not reused' in log


def test_resume_false_archives_the_previous_search(prepared, make_settings, tmp_path):
    (tmp_path / 'avoid.txt').write_text('0.009\n')
    first = make_settings(AVOID_PARAM=1.0, **GRID)
    _search(first, prepared)
    settings = make_settings(AVOID_PARAM=0.0, RESUME=False, LR_MIN=0.002, LR_MAX=0.003, STEP=0.001)
    _, log = _search(settings, prepared)
    [archive] = [p for p in os.listdir(tmp_path) if p.startswith('multi-result-archive-')]
    archived = pd.read_csv(tmp_path / archive / 'results.csv')
    assert list(archived['lr']) == [0.001, 0.0025, 0.004]
    assert '0.001 TinyNet' in (tmp_path / archive / 'avoid.txt').read_text()
    assert os.path.isdir(tmp_path / archive / 'TinyNet')
    assert [r['lr'] for r in _rows(settings)] == ['0.002', '0.003']
    assert (tmp_path / 'avoid.txt').read_text() == '0.009\n'
    assert 'RESUME=False: earlier results moved to' in log and 'Starting a fresh search' in log


def test_summary_has_one_row_per_model_with_best_trial(prepared, make_settings):
    settings = make_settings(LR_MIN=0.002, LR_MAX=0.003, STEP=0.001)
    summary, _ = _search(settings, prepared, [TinyNet, TinyNetB])
    on_disk = pd.read_csv(os.path.join(settings.MODEL_SAVE_PATH, 'summary.csv'))
    assert list(on_disk['model']) == ['TinyNet', 'TinyNetB']
    for col in ('best_lr', 'result', 'val_f1', 'test_f1', 'onnx_kb', 'latency_ms', 'params', 'folder'):
        assert col in on_disk.columns
    rows = _rows(settings)
    for _, entry in on_disk.iterrows():
        mine = [r for r in rows if r['model'] == entry['model']]
        best = max(mine, key=lambda r: (int(r['yy']), int(r['xx'])))
        assert entry['result'] == f"{best['xx']}-{best['yy']}"
        assert np.isclose(entry['best_lr'], float(best['lr']))
        assert os.path.isdir(entry['folder'])


# ------------------------------------------------------------------- stage one -> stage two
PICKS = [   # summary rows -> (model, lr) of the pick: best score, ties to the smaller ONNX
    ([dict(model='A', best_lr='0.003', score=0.9, onnx_kb=80.0, result='95-90'),
      dict(model='B', best_lr='0.004', score=0.9, onnx_kb=13.28, result='94-90')], ('B', '0.004')),
    ([dict(model='A', best_lr='0.003', score=0.91, onnx_kb=80.0, result='95-91'),
      dict(model='B', best_lr='0.004', score=0.9, onnx_kb=13.28, result='94-90')], ('A', '0.003')),
    ([dict(model='A', best_lr=float('nan'), score=float('nan'), onnx_kb=float('nan'))], None),
    ([], None),
]


@pytest.mark.parametrize('rows,expected', PICKS)
def test_recommended_pick(rows, expected):
    pick = recommended_pick(rows)
    assert (pick and (pick['model'], pick['lr'])) == expected


def test_stage_one_ends_with_the_pick_and_the_exact_next_step(make_settings):
    settings = make_settings(LEARNING_RATE=0.003)
    pick = recommended_pick([dict(model='OptimizedAFNet', best_lr='0.004', score=0.97,
                                  onnx_kb=13.28, result='98-97')])
    text = '\n'.join(next_step_lines(pick, settings))
    assert 'Recommended: OptimizedAFNet at learning rate 0.004 (val 98-97, 13.28 KB' in text
    assert 'public/ss_model.py' in text and 'AFNet-like' in text
    assert text.endswith('python train_final.py LEARNING_RATE=0.004')
    same = next_step_lines(dict(pick, model='AFNet', lr='0.003'), settings)
    assert same[-1].endswith('python train_final.py') and 'already scales AFNet' in same[-1]
    other = '\n'.join(next_step_lines(dict(pick, model='SepNet'), settings))
    assert 'put SepNet in public/ss_model.py' in other and 'docs/stage-two.md' in other
