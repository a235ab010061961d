"""End-to-end tests: train_multi.py and train_final.py run as a user runs them (subprocesses,
cwd = a temporary project folder), on the small real data set, with tiny settings.

Exit codes: 0 done, 2 bad settings or data (an `error: ...` line naming the thing), 130
interrupted (Ctrl+C / SIGINT), after which a rerun resumes without repeating finished work.
"""
import concurrent.futures as futures
import importlib.util
import math
import os
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch

from conftest import (ROOT, output, run_script, settings_values, start_script, write_params,
                      write_segment)
from public.cli import main
from public.core.settings import load_settings
from public.dataset import load_folder
import public.model  # noqa: F401  (registers the models)
from public.models.registry import get_model_class
from public.search.avoid import AvoidList

MODELS = ['AFNet', 'ShuffleNetV2', 'OptimizedAFNet']


def _project(folder, data, **overrides):
    """A project folder with params.py (small data, fast settings, outputs inside it)."""
    folder = Path(folder)
    values = settings_values(folder, data, **overrides)
    for name in ('MODEL_SAVE_PATH', 'TEMP_DIR', 'AVOID_FILE_PATH', 'FINAL_RESULT_DIR'):
        values[name] = os.path.relpath(values[name], folder)      # relative: resolved in cwd
    write_params(folder, **values)
    return folder


def _csv_rows(path):
    return pd.read_csv(path, dtype=str, keep_default_na=False) if os.path.exists(path) \
        else pd.DataFrame()


def _test_segments(data, n=6):
    seg = load_folder(str(data.test), 1250, progress=False)
    return seg.x[:n]


def _check_result_folder(folder, model, x):
    """saved.pth (weights only) and saved.onnx are the same model; the ONNX size is recorded."""
    files = set(os.listdir(folder))
    assert {'saved.pth', 'saved.onnx', 'evaluation_metrics.txt', 'params_used.py'} <= files
    model.load_state_dict(torch.load(os.path.join(folder, 'saved.pth'), weights_only=True))
    model.eval()
    session = ort.InferenceSession(os.path.join(folder, 'saved.onnx'),
                                   providers=['CPUExecutionProvider'])
    got = session.run(None, {session.get_inputs()[0].name: x[..., None]})[0]
    with torch.no_grad():
        expected = model(torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(-1)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)
    text = open(os.path.join(folder, 'evaluation_metrics.txt')).read()
    kb = os.path.getsize(os.path.join(folder, 'saved.onnx')) / 1024
    assert f'ONNX file size: {kb:.2f} KB' in text           # two decimals, as the original
    for label in ('F1 Score:', 'Accuracy:', 'Precision:', 'Recall:'):
        assert label in text
    return text


# ----------------------------------------------------------------------------- stage one

@pytest.fixture(scope='module')
def stage_one(tmp_path_factory, small_data):
    """train_multi.py once (AVOID_PARAM=1.0 prunes every trial), then again (resume)."""
    project = _project(tmp_path_factory.mktemp('stage1'), small_data, LR_MIN=0.002,
                       LR_MAX=0.003, STEP=0.001, AVOID_PARAM=1.0)
    first = run_script('train_multi.py', project)
    results = project / 'multi-result' / 'results.csv'
    snapshot = (results.read_text() if results.exists() else '',
                (project / 'avoid.txt').read_text() if (project / 'avoid.txt').exists() else '')
    second = run_script('train_multi.py', project) if first.returncode == 0 else None
    return project, first, second, snapshot


def test_stage_one_runs_every_registered_model(stage_one):
    project, first, _, _ = stage_one
    assert first.returncode == 0, output(first)[-3000:]
    log = first.stdout
    assert 'Starting a fresh search' in log and 'Done in' in log
    assert log.index('AFNet: searching') < log.index('ShuffleNetV2: searching') \
        < log.index('OptimizedAFNet: searching')


def test_stage_one_results_table_has_one_row_per_trial(stage_one):
    project, first, _, _ = stage_one
    assert first.returncode == 0
    rows = _csv_rows(project / 'multi-result' / 'results.csv')
    for col in ('model', 'lr', 'status', 'epochs', 'stop_reason', 'val_f1', 'val_accuracy',
                'val_precision', 'val_recall', 'test_f1', 'test_accuracy', 'test_precision',
                'test_recall', 'onnx_kb', 'latency_ms', 'params', 'wall_s', 'seed'):
        assert col in rows.columns, col
    # lr 0.002 trains and is pruned (AVOID_PARAM=1.0); 0.003 is within 2*STEP: skipped
    assert list(rows['model']) == MODELS
    assert set(rows['lr']) == {'0.002'} and set(rows['status']) == {'ok'}
    assert set(rows['epochs'].astype(int)) == {1} and set(rows['stop_reason']) == {'max-epochs'}
    assert set(rows['seed'].astype(int)) == {42}
    for _, r in rows.iterrows():
        assert int(r['onnx_kb']) == math.ceil(int(r['onnx_bytes']) / 1024)
        assert float(r['latency_ms']) > 0 and int(r['params']) > 0 and float(r['wall_s']) > 0
        assert 0 <= float(r['test_f1']) <= 1 and 0 <= float(r['val_recall']) <= 1
    assert first.stdout.count('lr=0.003: skipped (avoid.txt has 0.002 for ') == 3


def test_stage_one_best_folders_are_complete_and_consistent(stage_one, small_data):
    project, first, _, _ = stage_one
    assert first.returncode == 0
    rows = _csv_rows(project / 'multi-result' / 'results.csv')
    x = _test_segments(small_data)
    for _, r in rows.iterrows():
        model_dir = project / 'multi-result' / r['model']
        visible = [e for e in os.listdir(model_dir) if not e.startswith('.')]
        assert visible == [f"{r['xx']}-{r['yy']}"], 'one best folder, no leftovers'
        assert not [e for e in os.listdir(model_dir) if e.startswith('.')]
        folder = model_dir / visible[0]
        model = get_model_class(r['model'])(input_size=1250, in_channels=1, num_classes=2)
        text = _check_result_folder(folder, model, x)
        assert f"Model: {r['model']}" in text and 'Learning Rate: 0.002' in text
        assert math.ceil(os.path.getsize(folder / 'saved.onnx') / 1024) == int(r['onnx_kb'])
        used = load_settings([], params_path=str(folder / 'params_used.py'))
        assert (used.NUM_EPOCHS, used.AVOID_PARAM, used.LR_MIN) == (1, 1.0, 0.002)


def test_stage_one_writes_scoped_avoid_lines_and_a_summary(stage_one):
    project, first, _, _ = stage_one
    assert first.returncode == 0
    entries = AvoidList(str(project / 'avoid.txt'), 0.001).entries
    assert sorted((e[0], e[1]) for e in entries) == sorted((0.002, m) for m in MODELS)
    summary = pd.read_csv(project / 'multi-result' / 'summary.csv')
    assert list(summary['model']) == MODELS
    assert (summary['onnx_kb'] > 0).all() and (summary['latency_ms'] > 0).all()
    assert 'Summary (best trial per model' in first.stdout


def test_stage_one_rerun_resumes_and_repeats_nothing(stage_one):
    project, first, second, (results_before, avoid_before) = stage_one
    assert second is not None and second.returncode == 0, output(second)[-3000:]
    assert 'Resuming from' in second.stdout
    assert 'lr=0.002: finished in an earlier run; skipped' in second.stdout
    assert (project / 'multi-result' / 'results.csv').read_text() == results_before
    assert (project / 'avoid.txt').read_text() == avoid_before


def test_stage_one_reports_and_uses_num_threads(stage_one):
    _, first, _, _ = stage_one
    assert '1 torch thread(s) per trial' in first.stdout.splitlines()[0]


# ----------------------------------------------------------------------------- interrupts

def _wait_for_rows(path, proc, n=1, timeout=150):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        if path.exists() and len(_csv_rows(path)) >= n:
            return True
        time.sleep(0.1)
    return False


def _interrupt(proc):
    proc.send_signal(signal.SIGINT)
    try:
        rc = proc.wait(timeout=60)
    finally:
        proc.log_file.close()
    return rc


def _interrupt_after_first_row(script, project, table):
    """Start script, SIGINT it once `table` has a row; (exit code, its log)."""
    proc = start_script(script, project)
    try:
        assert _wait_for_rows(table, proc), (project / 'run.log').read_text()[-3000:]
        rc = _interrupt(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return rc, (project / 'run.log').read_text()


def test_sigint_stops_stage_one_and_a_rerun_resumes(tmp_path, small_data):
    project = _project(tmp_path, small_data, NUM_EPOCHS=1, LR_MIN=0.001, LR_MAX=0.003,
                       STEP=0.0005, AVOID_PARAM=1.0)
    results = project / 'multi-result' / 'results.csv'
    rc, log = _interrupt_after_first_row('train_multi.py', project, results)
    assert rc == 130, log[-3000:]
    assert 'Interrupted' in log and 'resume' in log
    before = _csv_rows(results)
    assert 1 <= len(before) < 6

    rerun = run_script('train_multi.py', project)
    assert rerun.returncode == 0, output(rerun)[-3000:]
    assert 'Resuming from' in rerun.stdout
    rows = _csv_rows(results)
    pd.testing.assert_frame_equal(rows.iloc[:len(before)], before)     # history kept
    ok = rows[rows['status'] == 'ok']
    assert not ok.duplicated(['model', 'lr']).any(), 'a finished trial was repeated'
    for model in MODELS:                        # the same trials as an uninterrupted search
        assert list(ok[ok['model'] == model]['lr']) == ['0.001', '0.0025']
    lines = [ln for ln in (project / 'avoid.txt').read_text().splitlines()
             if ln.split('#')[0].strip()]
    assert len(lines) == len(set(ln.split('#')[0].strip() for ln in lines)), 'no duplicates'
    entries = AvoidList(str(project / 'avoid.txt'), 0.0005).entries
    pruned = rows[rows['pruned'].astype(str) == 'True']
    assert sorted((e[0], e[1]) for e in entries) == \
        sorted((float(lr), m) for m, lr in zip(pruned['model'], pruned['lr']))


def test_sigint_stops_stage_two_and_a_rerun_does_not_retrain(tmp_path, small_data):
    project = _project(tmp_path, small_data, NUM_EPOCHS=1, CHANNEL_SCALES=(1, 2),
                       FC_SCALES=(1, 2), SIZE_TARGET_KB=1000, METRIC_TARGET=100)
    table = project / 'temp' / 'stage2_results.csv'
    rc, log = _interrupt_after_first_row('train_final.py', project, table)
    assert rc == 130, log[-3000:]
    assert 'resume' in log
    done = list(_csv_rows(table)['candidate'])
    assert 1 <= len(done) < 4

    rerun = run_script('train_final.py', project)
    assert rerun.returncode == 3, output(rerun)[-3000:]       # METRIC_TARGET=100: a miss
    for name in done:
        assert re.search(rf'{name} .*\(finished earlier: not retrained\)', rerun.stdout)
    trained_now = re.findall(r'^\s+(c\d-f\d): ok,', rerun.stdout, re.M)
    assert sorted(trained_now + done) == sorted(f'c{c}-f{f}' for c in (1, 2) for f in (1, 2))
    rows = _csv_rows(table)
    assert sorted(rows['candidate']) == sorted(trained_now + done), 'each candidate once'
    assert set(rows['status']) == {'ok'}
    assert 'No candidate met METRIC_TARGET=100: the closest, ' in rerun.stdout
    [folder] = [e for e in os.listdir(project / 'final') if not e.startswith('.')]
    assert folder.endswith('-MISS')


# ----------------------------------------------------------------------------- stage two

@pytest.fixture(scope='module')
def stage_two(tmp_path_factory, small_data):
    project = _project(tmp_path_factory.mktemp('stage2'), small_data, CHANNEL_SCALES=(1, 2),
                       FC_SCALES=(1,), SIZE_TARGET_KB=12, METRIC_TARGET=1)
    return project, run_script('train_final.py', project)


def test_stage_two_publishes_the_smallest_model_meeting_the_targets(stage_two, small_data):
    from public import ss_model
    project, run = stage_two
    rows = _csv_rows(project / 'temp' / 'stage2_results.csv')
    ok = rows[rows['status'] == 'ok']
    assert list(ok['candidate']) == ['c1-f1']     # BudgetNet c1-f1 8.4 KB; c2-f1 14.6 > 12 KB
    r = ok.iloc[0]
    met = int(r['yy']) >= 1
    assert run.returncode == (0 if met else 3), output(run)[-3000:]   # 3: a miss
    assert 'c2-f1' in run.stdout and 'over size budget: never trained' in run.stdout
    [folder] = [e for e in os.listdir(project / 'final') if not e.startswith('.')]
    assert folder == f"{r['xx']}-{r['yy']}" + ('' if met else '-MISS')
    model = ss_model.AFNet(ss_model.generate_config(1, 1, 1250))
    text = _check_result_folder(project / 'final' / folder, model, _test_segments(small_data))
    assert os.path.getsize(project / 'final' / folder / 'saved.onnx') <= 12 * 1024
    if int(r['yy']) >= 1:
        assert 'c1-f1 meets both targets' in run.stdout and 'meets both targets' in text


def test_stage_two_table_lists_over_size_candidates(stage_two):
    project, run = stage_two
    rows = _csv_rows(project / 'temp' / 'stage2_results.csv')
    if 'c1-f1 meets both targets' not in run.stdout:
        pytest.skip('c1-f1 did not meet METRIC_TARGET=1; the search reached c2-f1')
    assert list(rows[rows['status'] == 'over-size']['candidate']) == ['c2-f1']


# ----------------------------------------------------------------------------- bad inputs

def _data_folder(folder, small_data, subjects=2, extra=None):
    folder.mkdir(parents=True)
    names = sorted(os.listdir(small_data.train))
    chosen = sorted({n.split('-')[0] for n in names})[:subjects]
    for subject in chosen:
        for name in [n for n in names if n.startswith(subject + '-')][:3]:
            shutil.copy(small_data.train / name, folder / name)
    for name, text in (extra or {}).items():
        write_segment(folder / name, text=text)
    return str(folder)


def _lines(n, bad_at=None, bad='x'):
    return ''.join((bad if i == bad_at else f'{0.01 * i:.4f}') + '\n' for i in range(n))


def _case_missing(d, data):
    return {'DATA_DIR': str(d / 'nope')}, []


def _case_empty(d, data):
    (d / 'empty').mkdir()
    return {'DATA_DIR': str(d / 'empty')}, []


def _case_non_numeric(d, data):
    return {'DATA_DIR': _data_folder(d / 'data', data, extra={'S9-N-0.txt': _lines(1250, 6)})}, []


def _case_wrong_length(d, data):
    return {'DATA_DIR': _data_folder(d / 'data', data, extra={'S9-N-0.txt': _lines(1249)})}, []


def _case_bad_name(d, data):
    return {'DATA_DIR': _data_folder(d / 'data', data, extra={'S9_N_0.txt': _lines(1250)})}, []


def _case_one_subject(d, data):
    return {'DATA_DIR': _data_folder(d / 'data', data, subjects=1), 'TEST_DIR': ''}, []


def _case_bad_avoid(d, data):
    (d / 'avoid.txt').write_text('# pruned\n0.002\nzero point one\n')
    return {}, []


def _case_test_leads(d, data):
    two_leads = ''.join(f'{0.01 * i:.3f} {0.02 * i:.3f}\n' for i in range(1250))
    folder = d / 'test2'
    folder.mkdir()
    for i in range(2):
        write_segment(folder / f'S30{i}-N-0.txt', text=two_leads)
    return {'TEST_DIR': str(folder)}, []


def _settings_case(*args, **params):
    return lambda d, data: (params, list(args))


def _case_syntax(d, data):
    return {}, []


# id -> (script, case builder, regex the `error:` line must match)
BAD_INPUTS = {
    'missing-data-folder': ('train_multi.py', _case_missing, r'nope: data (folder|path) does not exist'),
    'empty-data-folder': ('train_multi.py', _case_empty, r'empty: data folder is empty'),
    'non-numeric-line': ('train_multi.py', _case_non_numeric,
                         r"data/S9-N-0\.txt: line 7: 'x' is not a number"),
    'wrong-length': ('train_multi.py', _case_wrong_length,
                     r'S9-N-0\.txt: has 1249 samples, but INPUT_SIZE=1250'),
    'bad-file-name': ('train_multi.py', _case_bad_name,
                      r'S9_N_0\.txt: file name does not follow the pattern'),
    'one-subject': ('train_multi.py', _case_one_subject, r'has 1 subject\(s\).*needs at least 2'),
    'malformed-avoid-line': ('train_multi.py', _case_bad_avoid,
                             r"avoid\.txt: line 3: 'zero point one' is not a valid entry"),
    'lr-min-above-max': ('train_multi.py', _settings_case('LR_MIN=0.01', 'LR_MAX=0.001'),
                         r'command line: LR_MIN must be <= LR_MAX, got LR_MIN=0\.01 and LR_MAX=0\.001'),
    'step-zero': ('train_multi.py', _settings_case(STEP=0),
                  r'params\.py: STEP must be a number > 0, got STEP=0$'),
    'unknown-setting': ('train_multi.py', _settings_case('NUM_EPOCH=3'),
                        r'command line: unknown setting NUM_EPOCH \(did you mean NUM_EPOCHS\?\)'),
    'params-syntax-error': ('train_multi.py', _case_syntax, r'params\.py: cannot be executed'),
    'empty-channel-scales': ('train_final.py', _settings_case(CHANNEL_SCALES=()),
                             r'CHANNEL_SCALES must be a non-empty list/tuple of ints >= 1, '
                             r'got CHANNEL_SCALES=\(\)'),
    'metric-target-zero': ('train_final.py', _settings_case('METRIC_TARGET=0'),
                           r'METRIC_TARGET must be a number in \(0, 100\], got METRIC_TARGET=0'),
    'size-target-negative': ('train_final.py', _settings_case(SIZE_TARGET_KB=-5),
                             r'SIZE_TARGET_KB must be a number > 0, got SIZE_TARGET_KB=-5'),
    'cuda-without-gpu': ('train_multi.py', _settings_case(DEVICE='cuda'), r'DEVICE'),
    'test-folder-leads': ('train_multi.py', _case_test_leads,
                          r'test2: segments have 2 leads, the training data.s have 1'),
}
XFAIL = {}


def _case_folder(root, small_data, case_id):
    _, build, _ = BAD_INPUTS[case_id]
    d = root / case_id
    d.mkdir()
    params, args = build(d, small_data)
    values = dict(params, CACHE_DIR=str(d / 'cache'), TEST_DIR=params.get('TEST_DIR', ''))
    _project(d, small_data, **values)
    if case_id == 'params-syntax-error':
        with open(d / 'params.py', 'a') as f:
            f.write('NUM_EPOCHS = = 2\n')
    return d, ['--params', str(d / 'params.py'), *args]


def _script_module(script):
    spec = importlib.util.spec_from_file_location(f'_atml_{script[:-3]}', ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bad_params():
    for case_id in BAD_INPUTS:
        marks = []
        if case_id in XFAIL:
            marks.append(pytest.mark.xfail(strict=True, reason=XFAIL[case_id]))
        if case_id == 'cuda-without-gpu':
            marks.append(pytest.mark.skipif(torch.cuda.is_available(), reason='CUDA present'))
        yield pytest.param(case_id, marks=marks, id=case_id)


def _check_bad_run(folder, rc, stdout, pattern):
    errors = [ln for ln in stdout.splitlines() if ln.startswith('error: ')]
    assert rc == 2, stdout[-2000:]
    assert len(errors) == 1, stdout[-2000:]
    assert re.search(pattern, errors[0]), errors[0]
    results = folder / 'multi-result' / 'results.csv'
    assert not results.exists() or len(_csv_rows(results)) == 0, 'no trial ran'


@pytest.mark.parametrize('case_id', list(_bad_params()))
def test_bad_input_stops_with_exit_2_and_an_error_naming_it(tmp_path, small_data, monkeypatch,
                                                           capsys, case_id):
    """The scripts' entry point (public.cli.main with the script's run) in this process."""
    script, _, pattern = BAD_INPUTS[case_id]
    folder, argv = _case_folder(tmp_path, small_data, case_id)
    monkeypatch.chdir(folder)
    rc = main(_script_module(script).run, argv, name=script)
    _check_bad_run(folder, rc, capsys.readouterr().out, pattern)


# A few of the cases again as real processes: the exit status a shell sees.
SUBPROCESS_CASES = ['non-numeric-line', 'metric-target-zero']


@pytest.fixture(scope='module')
def bad_processes(tmp_path_factory, small_data):
    root = tmp_path_factory.mktemp('bad-inputs')

    def run(case_id):
        folder, argv = _case_folder(root, small_data, case_id)
        return folder, run_script(BAD_INPUTS[case_id][0], folder, *argv[2:], params=argv[1],
                                  timeout=180)
    with futures.ThreadPoolExecutor(len(SUBPROCESS_CASES)) as pool:
        return dict(zip(SUBPROCESS_CASES, pool.map(run, SUBPROCESS_CASES)))


@pytest.mark.parametrize('case_id', SUBPROCESS_CASES)
def test_bad_input_process_exits_2(bad_processes, case_id):
    folder, proc = bad_processes[case_id]
    _check_bad_run(folder, proc.returncode, proc.stdout, BAD_INPUTS[case_id][2])
    assert 'Traceback' not in proc.stderr


@pytest.mark.parametrize('script', ['train_multi.py', 'train_final.py'])
def test_help_exits_0_without_work(tmp_path, monkeypatch, capsys, script):
    monkeypatch.chdir(tmp_path)
    assert main(_script_module(script).run, ['--help'], name=script) == 0
    assert f'usage: python {script}' in capsys.readouterr().out
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('status,expected', [(None, 0), (0, 0), (3, 3), (True, 0)])
def test_a_runs_own_status_is_the_exit_status(monkeypatch, capsys, status, expected):
    # stage two's run() returns 3 when no candidate meets both targets (cli.main's docstring)
    monkeypatch.chdir(ROOT)          # params.py is read, nothing is written
    assert main(lambda settings, interrupts: status, [], name='train_final.py') == expected
    assert 'Done in' in capsys.readouterr().out
    assert main.__doc__.count('3 stage two finished but no candidate meets both targets') == 1
