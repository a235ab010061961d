"""The crash-consistency rule's other half: derived files are rebuilt from the results table,
one run per folder, and the inputs that used to be mishandled silently or late."""
import os
import shutil
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import ROOT, output, run_script, settings_values, write_params
from public.core.settings import SETTINGS, SettingsError, trial_settings
from public.core.errors import BusyError
from public.results.keys import settings_key
from public.results.store import RunLock, clean_scratch
from public.search.stage_one import result_folders
from test_search import _rows, _search  # the same in-process stage-one helpers

# Settings that do not change what a trial computes, each with the reason. A new setting
# must be either marked KEY/KEY2 in public/core/settings.py's rules table or listed here: an
# unlisted, unmarked setting fails test_every_setting_is_classified_for_the_settings_key.
NOT_TRIAL = {
    'CACHE_DIR': 'where parsed data is cached', 'LR_MIN': 'the lr is a column of its own',
    'LR_MAX': 'the lr is a column', 'STEP': 'the lr is a column; STEP only prunes',
    'AVOID_FILE_PATH': 'a path', 'AVOID_PARAM': 'decides pruning of later trials, not a trial',
    'STAGE1_TARGET': 'decides when a search stops', 'MODELS': 'which models are searched',
    'MODEL_SAVE_PATH': 'a path', 'RESUME': 'whether to reuse', 'DEVICE': 'where it runs',
    'NUM_THREADS': 'speed', 'NUM_WORKERS': 'unused', 'PREFETCH_FACTOR': 'unused',
    'LATENCY_RUNS': 'measurement only', 'CHANNEL_SCALES': 'the candidate is a column',
    'FC_SCALES': 'the candidate is a column', 'METRIC_TARGET': 'decides the winner',
    'SIZE_TARGET_KB': 'decides feasibility', 'TEMP_DIR': 'a path', 'FINAL_RESULT_DIR': 'a path',
    'WORKERS': 'parallelism; results equal the serial run', 'RAY_ADDRESS': 'where it runs',
    'PRUNE_FRACTIONS': 'which candidates exist; the candidate (c4-f2-p50) is a column',
    'LATENCY_TARGET_MS': 'decides feasibility', 'RAM_TARGET_KB': 'decides feasibility',
    'CANDIDATE_ORDER': 'the order candidates are tried in',
}


def test_every_setting_is_classified_for_the_settings_key():
    keyed = set(trial_settings(2))
    unclassified = sorted(set(SETTINGS) - keyed - set(NOT_TRIAL))
    assert unclassified == [], (f"{unclassified}: mark them KEY/KEY2 in public/core/settings.py's "
                                f"rules table, or list them in NOT_TRIAL with the reason")
    assert not keyed & set(NOT_TRIAL)


def test_every_keyed_setting_changes_the_key(make_settings):
    base = make_settings()
    changed = {'DATA_FORMAT': 'txt', 'SHORTER': 'exclude', 'LONGER': 'crop',
               'POSITIVE_LABELS': ('N',), 'CLASSES': ('A', 'B'), 'VAL_FOLDS': (9,),
               'SKIP_BAD_FILES': True, 'SELECT_ON': 'test', 'SELECT_METRIC': 'f1',
               'QUANTIZE_INT8': True, 'TEST_DIR': '', 'DATA_DIR': '/elsewhere',
               'AUGMENT': False, 'NORMALIZE': 'segment', 'CLASS_WEIGHTS': 'balanced',
               'REFIT': True, 'LABEL_SEPARATOR': ';', 'NO_AF_SUBJECT': 'skip',
               'CONTEST': 'tdc2022', 'SCHEDULER': 'halving',
               'WEIGHT_AVERAGING': 'ema', 'LR_SCHEDULE': 'cosine', 'DISTILL_FROM': 'teacher/95-90'}
    changed['CALIBRATE_THRESHOLD'] = True
    needs = {'LABEL_MODE': dict(LABEL_MODE='multilabel', CLASSES=('A', 'B')),
             'QAT_EPOCHS': dict(QAT_EPOCHS=2, QUANTIZE_INT8=True),
             # keyed only with INT8 on: test_int8_weight_range_keys_only_int8_runs
             'INT8_REDUCE_RANGE': dict(INT8_REDUCE_RANGE=False, QUANTIZE_INT8=True),
             # keyed only when halving: a grid search does not depend on them
             'HALVING_MIN_EPOCHS': dict(HALVING_MIN_EPOCHS=2, SCHEDULER='halving'),
             'HALVING_ETA': dict(HALVING_ETA=2, SCHEDULER='halving'),
             # keyed only when the contest picks the answer: the test of the contest latency
             'CONTEST_LATENCY': dict(CONTEST_LATENCY='macs', SELECT_METRIC='contest'),
             'MACS_PER_MS': dict(MACS_PER_MS=5000, SELECT_METRIC='contest')}
    for name in trial_settings(2):
        value = changed.get(name)
        if value is None and name not in needs:
            old = getattr(base, name)
            value = old + 1 if isinstance(old, int) else old * 0.5
        other = make_settings(**needs.get(name, {name: value}))
        assert settings_key(other, 2) != settings_key(base, 2), name


def test_settings_added_later_keep_old_keys_at_their_neutral_value(make_settings):
    # An upgrade that adds settings must not orphan the rows of the earlier version: at the
    # value that reproduces the old behaviour they are left out of the key.
    import hashlib
    import json
    from public.core.settings import INTRODUCED_AT, settings_dict
    base = make_settings()
    values = settings_dict(base)
    old = {k: values[k] for k in trial_settings(2) if k not in INTRODUCED_AT}
    expected = hashlib.sha1(json.dumps(old, sort_keys=True, default=str).encode()).hexdigest()[:10]
    assert settings_key(base, 2) == expected
    assert settings_key(make_settings(REFIT=True), 2) != expected


def test_int8_weight_range_keys_only_int8_runs(make_settings):
    """INT8_REDUCE_RANGE changes the INT8 file, so it is in the key of an INT8 stage two
    (at False, the earlier 8-bit files, the earlier key); a float-only run ignores it."""
    from public.core.settings import INTRODUCED_AT
    assert INTRODUCED_AT['INT8_REDUCE_RANGE'] is False
    assert make_settings().INT8_REDUCE_RANGE is True, "params.py's default"
    float_only = {settings_key(make_settings(INT8_REDUCE_RANGE=v), 2) for v in (True, False)}
    assert len(float_only) == 1
    int8 = {v: settings_key(make_settings(QUANTIZE_INT8=True, INT8_REDUCE_RANGE=v), 2)
            for v in (True, False)}
    assert int8[True] != int8[False]
    assert int8[False] not in float_only and int8[True] not in float_only
    with pytest.raises(SettingsError, match=r"INT8_REDUCE_RANGE.*True or False"):
        make_settings(INT8_REDUCE_RANGE='yes')


def test_halving_settings_key_only_halving_searches(make_settings):
    """SCHEDULER='grid' keeps the key of the search before schedulers existed, whatever
    HALVING_MIN_EPOCHS and HALVING_ETA say; under 'halving' each of them changes it."""
    grid = {settings_key(make_settings(HALVING_MIN_EPOCHS=r, HALVING_ETA=e), 1)
            for r in (1, 3) for e in (2, 3)}
    assert grid == {settings_key(make_settings(), 1)}
    halving = {settings_key(make_settings(SCHEDULER='halving', HALVING_MIN_EPOCHS=r,
                                          HALVING_ETA=e), 1) for r in (1, 3) for e in (2, 3)}
    assert len(halving) == 4 and not halving & grid
    with pytest.raises(SettingsError, match=r"HALVING_ETA must be an int >= 2"):
        make_settings(SCHEDULER='halving', HALVING_ETA=1)


def test_the_contest_latency_keys_only_searches_that_select_on_the_contest(make_settings):
    """CONTEST_LATENCY and MACS_PER_MS change only the contest column: a search selecting
    on another metric keeps its key (and the rows of versions before them, which scored
    the measured latency); one selecting on 'contest' keys them, and at 'measured' with
    the default MACS_PER_MS it has the key of those versions."""
    others = {settings_key(make_settings(CONTEST_LATENCY=c, MACS_PER_MS=m), 1)
              for c in ('macs', 'measured') for m in (100000, 5000)}
    assert others == {settings_key(make_settings(), 1)}
    contest = {(c, m): settings_key(make_settings(SELECT_METRIC='contest', CONTEST_LATENCY=c,
                                                  MACS_PER_MS=m), 1)
               for c in ('macs', 'measured') for m in (100000, 5000)}
    assert len({contest['macs', 100000], contest['macs', 5000], contest['measured', 100000]}) == 3
    import hashlib
    import json
    from public.core.settings import INTRODUCED_AT, settings_dict
    values = settings_dict(make_settings(SELECT_METRIC='contest', CONTEST_LATENCY='measured'))
    old = {k: values[k] for k in trial_settings(1) if k not in INTRODUCED_AT}
    assert contest['measured', 100000] == \
        hashlib.sha1(json.dumps(old, sort_keys=True, default=str).encode()).hexdigest()[:10]
    with pytest.raises(SettingsError, match=r"CONTEST_LATENCY must be one of 'macs', 'measured'"):
        make_settings(CONTEST_LATENCY='board')
    with pytest.raises(SettingsError, match=r"MACS_PER_MS must be a number > 0"):
        make_settings(MACS_PER_MS=0)


def test_a_grid_of_a_billion_rates_is_refused_up_front(make_settings):
    with pytest.raises(SettingsError, match=r"1,000,000,000 values; at most 10,000"):
        make_settings(LR_MIN=1e-9, LR_MAX=1.0, STEP=1e-9)


def test_test_dir_equal_to_data_dir_is_an_error(make_settings, small_data):
    with pytest.raises(SettingsError, match='TEST_DIR must be another folder than DATA_DIR'):
        make_settings(TEST_DIR=str(small_data.train) + '/')




def _best_folders(settings, model='TinyNet'):
    return result_folders(os.path.join(settings.MODEL_SAVE_PATH, model))


def test_missing_stale_and_doubled_best_folders_are_rebuilt_from_the_table(prepared, make_settings):
    settings = make_settings(LR_MIN=0.002, LR_MAX=0.003, STEP=0.001)
    summary, _ = _search(settings, prepared)
    [best] = _best_folders(settings)
    model_dir = os.path.join(settings.MODEL_SAVE_PATH, 'TinyNet')
    onnx = open(os.path.join(model_dir, best, 'saved.onnx'), 'rb').read()
    shutil.rmtree(os.path.join(model_dir, best))                        # lost
    shutil.copytree(os.path.join(ROOT, 'tests'), os.path.join(model_dir, '12-3'),
                    ignore=lambda *a: ['__pycache__'])                  # not ATML's: left alone
    _, log = _search(settings, prepared)
    assert sorted(_best_folders(settings)) == sorted([best, '12-3'])
    assert open(os.path.join(model_dir, best, 'saved.onnx'), 'rb').read() == onnx
    assert f'new best for TinyNet' in log
    shutil.rmtree(os.path.join(model_dir, '12-3'))
    shutil.copytree(os.path.join(model_dir, best), os.path.join(model_dir, '99-99'))  # doubled
    _search(settings, prepared)
    assert _best_folders(settings) == [best]
    on_disk = pd.read_csv(os.path.join(settings.MODEL_SAVE_PATH, 'summary.csv'))
    assert on_disk['folder'].tolist() == [os.path.join(model_dir, best)]


def test_another_settings_run_keeps_the_first_runs_best_folder(prepared, make_settings):
    first = make_settings(LR_MIN=0.002, LR_MAX=0.002, STEP=0.001)
    _search(first, prepared)
    [best1] = _best_folders(first)
    other = make_settings(LR_MIN=0.002, LR_MAX=0.002, STEP=0.001, NUM_EPOCHS=2)
    _, log = _search(other, prepared)
    kept = os.path.join(first.MODEL_SAVE_PATH, 'TinyNet', f"settings-{settings_key(first)}", best1)
    assert os.path.isfile(os.path.join(kept, 'saved.onnx')), log
    _, log = _search(first, prepared)                  # back to the first settings: no training
    assert 'finished in an earlier run; skipped' in log
    [again] = _best_folders(first)
    assert again == best1
    on_disk = pd.read_csv(os.path.join(first.MODEL_SAVE_PATH, 'summary.csv'))
    assert os.path.isdir(on_disk['folder'][0])


def test_avoid_lines_of_other_settings_do_not_prune(prepared, make_settings):
    first = make_settings(AVOID_PARAM=1.0, LR_MIN=0.002, LR_MAX=0.003, STEP=0.001)
    _search(first, prepared)                                 # 0.002 pruned under these settings
    other = make_settings(AVOID_PARAM=1.0, LR_MIN=0.002, LR_MAX=0.003, STEP=0.001,
                          DATA_DIR=first.DATA_DIR.rstrip('/') + '/../train')
    _, log = _search(other, prepared)
    assert [r['lr'] for r in _rows(other) if r['settings_key'] == settings_key(other)] == ['0.002']
    assert 'lr=0.002: skipped (avoid.txt' not in log


def test_a_foreign_line_in_results_csv_is_moved_out_and_pandas_reads_the_table(prepared,
                                                                               make_settings):
    settings = make_settings(LR_MIN=0.002, LR_MAX=0.003, STEP=0.001)
    _search(settings, prepared)
    path = os.path.join(settings.MODEL_SAVE_PATH, 'results.csv')
    lines = open(path).read().splitlines(True)
    open(path, 'w').writelines(lines[:2] + ['GARBAGE,not,a,row,"unterminated\n'] + lines[2:])
    _, log = _search(settings, prepared)
    assert 'line(s) 3 are not rows of this table; moved to' in log
    assert 'GARBAGE' in open(path + '.rejected').read()
    assert len(pd.read_csv(path)) == 2


def test_a_killed_runs_scratch_folder_is_removed(tmp_path):
    proc = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    dead = tmp_path / f'.atml-scratch-{proc.pid}-abc'
    dead.mkdir()
    (dead / 'trial.onnx').write_text('half')
    mine = tmp_path / f'.atml-scratch-{os.getpid()}-def'
    mine.mkdir()
    assert clean_scratch(str(tmp_path)) == []              # its process still runs
    proc.kill()
    proc.wait()
    assert clean_scratch(str(tmp_path)) == [dead.name]
    assert sorted(os.listdir(tmp_path)) == [mine.name]


def test_run_lock_refuses_a_second_holder_and_frees_on_exit(tmp_path):
    with RunLock(str(tmp_path), 'first'):
        with pytest.raises(BusyError, match=r'another ATML run \(first, pid \d+'):
            with RunLock(str(tmp_path), 'second'):
                pass
    with RunLock(str(tmp_path), 'third'):
        pass


def _project(folder, data, **overrides):
    values = settings_values(folder, data, **overrides)
    write_params(folder, **values)
    return folder


def _start_stage_one(project, tmp_path):
    """train_multi.py started in the background (output in first.log)."""
    log = open(tmp_path / 'first.log', 'w')
    return subprocess.Popen([sys.executable, str(ROOT / 'train_multi.py'), '--params',
                             str(project / 'params.py')], cwd=project, stdout=log,
                            stderr=subprocess.STDOUT)


def test_two_runs_in_one_folder_the_second_is_refused(small_data, tmp_path):
    project = _project(tmp_path, small_data, NUM_EPOCHS=3, LR_MIN=0.001, LR_MAX=0.004, STEP=0.001)
    first = _start_stage_one(project, tmp_path)
    lock = tmp_path / 'multi-result' / '.atml.lock'
    deadline = time.time() + 60
    while time.time() < deadline and not (lock.exists() and lock.read_text()):
        time.sleep(0.2)
    second = run_script('train_multi.py', project)
    first.wait(timeout=600)
    assert second.returncode == 2, output(second)
    assert 'another ATML run (train_multi.py, pid' in output(second)
    assert first.returncode == 0
    rows = pd.read_csv(tmp_path / 'multi-result' / 'results.csv')
    assert not rows.duplicated(['model', 'lr']).any()


def test_bad_inputs_are_reported_before_any_data_is_loaded(small_data, tmp_path):
    project = _project(tmp_path, small_data, DATA_DIR=str(tmp_path / 'no-such-folder'))
    (tmp_path / 'avoid.txt').write_text('0.0015 AFnet\nnot a rate\n')
    run = run_script('train_multi.py', project)
    assert run.returncode == 2
    assert "avoid.txt: line 2: 'not a rate' is not a valid entry" in output(run)
    (tmp_path / 'avoid.txt').write_text('0.0015 AFnet\n')
    run = run_script('train_multi.py', project)
    assert "line 1 names model 'AFnet', which is not registered (did you mean AFNet?)" in output(run)
    assert 'no-such-folder' in output(run) and run.returncode == 2
    for setting in ('MODEL_SAVE_PATH', 'TEMP_DIR'):
        (tmp_path / 'a-file').write_text('x')
        run = run_script('train_multi.py', project, f"{setting}={str(tmp_path / 'a-file')!r}")
        assert run.returncode == 2 and f"{setting}=" in output(run) and 'names a file' in output(run)


def _ray_processes(session_dir):
    """Processes whose command line mentions this run's Ray folder."""
    found = []
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{pid}/cmdline', 'rb') as f:
                if session_dir.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def test_kill_9_of_a_parallel_driver_then_rerun_completes_without_repeats(small_data, tmp_path):
    pytest.importorskip('ray')
    project = _project(tmp_path, small_data, WORKERS=2, NUM_EPOCHS=4, MODELS=('OptimizedAFNet',),
                       LR_MIN=0.001, LR_MAX=0.005, STEP=0.001)
    first = _start_stage_one(project, tmp_path)
    results = tmp_path / 'multi-result' / 'results.csv'
    deadline = time.time() + 180
    while time.time() < deadline and (not results.exists() or
                                      len(results.read_text().splitlines()) < 2):
        time.sleep(0.1)
    first.kill()                                     # SIGKILL: no clean-up at all
    first.wait()
    done_before = len(pd.read_csv(results))
    assert 1 <= done_before < 5
    deadline = time.time() + 30                      # Ray's processes go with their driver
    while time.time() < deadline and _ray_processes(str(tmp_path / 'temp' / 'ray')):
        time.sleep(0.5)
    assert _ray_processes(str(tmp_path / 'temp' / 'ray')) == []
    second = run_script('train_multi.py', project)
    assert second.returncode == 0, output(second)[-3000:]
    assert f'{done_before} finished trial(s) will not be repeated' in second.stdout
    rows = pd.read_csv(results)
    assert sorted(rows['lr']) == [0.001, 0.002, 0.003, 0.004, 0.005]
    assert len(rows) == 5, 'no trial recorded twice'


def test_a_model_appended_below_the_last_line_of_model_py_is_searched(tmp_path, small_data):
    project = tmp_path / 'project'
    shutil.copytree(ROOT / 'public', project / 'public', ignore=shutil.ignore_patterns('__pycache__'))
    shutil.copy(ROOT / 'train_multi.py', project)
    with open(project / 'public' / 'model.py', 'a') as f:       # where anyone appends a model
        f.write('\n\n@register_model\nclass AppendedNet(OptimizedAFNet):\n    pass\n')
    _project(project, small_data)
    run = subprocess.run([sys.executable, '-c', 'from public.core.settings import load_settings; '
                          'from train_multi import selected_models; '
                          'print([m.__name__ for m in selected_models(load_settings([]))])'],
                         cwd=project, capture_output=True, text=True)
    assert run.stdout.strip() == "['AFNet', 'ShuffleNetV2', 'OptimizedAFNet', 'AppendedNet']", run.stderr
