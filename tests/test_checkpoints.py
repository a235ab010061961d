"""Trial checkpoints (public/train/loop.py train_model(checkpoint=...), the checkpoint paths
of public/search/trial.py): a trial stopped mid-training resumes from its last finished epoch
and ends exactly as an uninterrupted one; real SIGKILLs of train_multi.py, serial and parallel."""
import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import (PARAMS, interrupt_after, output, run_script, settings_values, start_script,
                      write_params)
from public.core.settings import load_settings
from public.data.prepare import TrialData
from public.model import OptimizedAFNet
from public.results.table import TIMING_COLUMNS
from public.search.trial import checkpoint_path, clean_checkpoints
from public.train import loop
from public.train.loop import train_model

CPU = torch.device('cpu')


def _data(n_train=96, n_val=48, length=64, seed=0):
    g = np.random.default_rng(seed)
    return TrialData(torch.from_numpy(g.standard_normal((n_train, 1, length)).astype(np.float32)),
                     torch.from_numpy(g.integers(0, 2, n_train)),
                     torch.from_numpy(g.standard_normal((n_val, 1, length)).astype(np.float32)),
                     torch.from_numpy(g.integers(0, 2, n_val)))


def _settings(**kw):
    # AUGMENT=True (the default): the Augmenter's generator is part of the state to restore.
    base = dict(WEIGHT_DECAY=1e-3, PATIENCE=5, OVERFIT_GAP=0.0, SEED=3, NUM_EPOCHS=8,
                BATCH_SIZE=16, AUGMENT=True, CLASS_WEIGHTS='balanced')
    return load_settings([f"{k}={v!r}" for k, v in {**base, **kw}.items()],
                         params_path=str(PARAMS))


def _run(settings, lr=0.01, checkpoint=None, data=None):
    torch.manual_seed(0)
    model = OptimizedAFNet(input_size=64)
    return train_model(model, data or _data(), lr, settings, CPU, progress=False,
                       checkpoint=checkpoint)


def _interrupted(settings, checkpoint, after, monkeypatch, lr=0.01):
    """Run until `after` epochs are done, then Ctrl+C (KeyboardInterrupt) in the next one."""
    interrupt_after(monkeypatch, after, lambda: _run(settings, lr, checkpoint), checkpoint)


def _assert_same(a, b):
    assert a.state_dict.keys() == b.state_dict.keys()
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k]), k
    assert (a.history, a.epochs, a.best_epoch, a.stop_reason) == \
        (b.history, b.epochs, b.best_epoch, b.stop_reason)


@pytest.fixture(scope='module')
def uninterrupted():
    torch.set_num_threads(1)
    return _run(_settings())


@pytest.mark.parametrize('after', [1, 4])   # 4: after the LR scheduler's cut
def test_an_interrupted_trial_resumes_to_exactly_the_uninterrupted_result(
        tmp_path, monkeypatch, uninterrupted, after):
    path = str(tmp_path / 'state.pt')
    _interrupted(_settings(), path, after, monkeypatch)
    # RNG states moved on by something else in between (another trial in the same process)
    torch.manual_seed(1234)
    np.random.seed(99)
    resumed = _run(_settings(), checkpoint=path)
    assert resumed.resumed_at == after
    _assert_same(resumed, uninterrupted)
    assert uninterrupted.epochs > after + 1, 'the test must resume mid-training'


def test_a_finished_checkpoint_returns_the_result_without_training(tmp_path, monkeypatch,
                                                                   uninterrupted):
    path = str(tmp_path / 'state.pt')
    first = _run(_settings(), checkpoint=path)
    _assert_same(first, uninterrupted)
    monkeypatch.setattr(loop, '_train_epoch', lambda *a, **k: pytest.fail('trained again'))
    again = _run(_settings(), checkpoint=path)
    assert again.resumed_at == first.epochs
    _assert_same(again, uninterrupted)


def test_a_checkpoint_of_another_trial_is_not_resumed(tmp_path, monkeypatch, uninterrupted):
    path = str(tmp_path / 'state.pt')
    _interrupted(_settings(), path, 2, monkeypatch, lr=0.02)         # another learning rate
    fresh = _run(_settings(), checkpoint=path)
    assert fresh.resumed_at == 0
    _assert_same(fresh, uninterrupted)
    with open(path, 'wb') as f:                                       # a damaged file
        f.write(b'not a checkpoint')
    assert _run(_settings(), checkpoint=path).resumed_at == 0


# ----------------------------------------------------------------------------- real SIGKILLs

def _project(folder, data, **overrides):
    values = settings_values(folder, data, MODELS=('AFNet',), NUM_EPOCHS=6, PATIENCE=100,
                             BATCH_SIZE=8, **overrides)
    for name in ('MODEL_SAVE_PATH', 'TEMP_DIR', 'AVOID_FILE_PATH', 'FINAL_RESULT_DIR'):
        values[name] = os.path.relpath(values[name], folder)      # relative: resolved in cwd
    write_params(folder, **values)
    return Path(folder)


def _rows(project):
    path = project / 'multi-result' / 'results.csv'
    rows = pd.read_csv(path, dtype=str, keep_default_na=False) if path.exists() else pd.DataFrame()
    return rows.drop(columns=[c for c in TIMING_COLUMNS if c in rows.columns])


def _saved(project):
    """{path: state dict} of every saved.pth under multi-result/ (the best folder, the store)."""
    root = project / 'multi-result'
    return {str(p.relative_to(root)): torch.load(p, weights_only=False)
            for p in root.rglob('saved.pth')}


def _checkpoints(project):
    return sorted((project / 'temp' / 'checkpoints').glob('s1-*/*/state.pt'))


def _kill_mid_trial(project, ready=None):
    """Start train_multi.py, SIGKILL it once a trial checkpoint exists (>= 1 epoch done; or
    once `ready(checkpoints)` says so); (the checkpoints then, the number of rows then)."""
    proc = start_script('train_multi.py', project)
    ready = ready or bool
    try:
        deadline = time.time() + 120
        while not ready(_checkpoints(project)):
            assert proc.poll() is None and time.time() < deadline, \
                (project / 'run.log').read_text()[-3000:]
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)     # the driver (Ray reaps its workers)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.log_file.close()
    return _checkpoints(project), len(_rows(project))


def _reference(tmp_path, small_data, **overrides):
    """An uninterrupted run in another folder, started now (it runs beside the killed one)."""
    project = _project(tmp_path / 'reference', small_data, **overrides)
    return project, start_script('train_multi.py', project)


@pytest.mark.parametrize('workers', [1, pytest.param(2, marks=pytest.mark.skipif(
    not os.environ.get('ATML_SLOW_TESTS'), reason='about 60 s (three Ray starts); '
                                                  'ATML_SLOW_TESTS=1 runs it'))])
def test_a_sigkilled_search_resumes_its_trials_mid_training(tmp_path, small_data, workers):
    # Two learning rates: with WORKERS=2 both trials run (and are killed) at once.
    lrs = dict(LR_MIN=0.002, LR_MAX=0.003, STEP=0.001, WORKERS=workers)
    reference, ref_proc = _reference(tmp_path, small_data, **lrs)
    project = _project(tmp_path / 'killed', small_data, **lrs)
    left, rows_at_kill = _kill_mid_trial(project)
    assert left and rows_at_kill == 0
    epochs = {p: torch.load(p, weights_only=False)['epoch'] for p in left}
    assert all(1 <= e < 6 for e in epochs.values()), epochs

    rerun = run_script('train_multi.py', project)
    assert rerun.returncode == 0, output(rerun)[-3000:]
    resumed = {lr: int(k) for lr, k in re.findall(r"AFNet lr=(\S+): ok.*\(resumed at epoch (\d+)\)",
                                                 rerun.stdout)}
    for path, epoch in epochs.items():      # a Ray worker may finish an epoch or two more
        lr = path.parent.name.split('_')[-1]    # before it notices its driver is gone
        assert resumed.get(lr, 0) >= epoch, (epochs, rerun.stdout[-3000:])
    assert ref_proc.wait(timeout=240) == 0, (reference / 'run.log').read_text()[-3000:]
    ref_proc.log_file.close()
    assert 'resumed' not in (reference / 'run.log').read_text()

    got, want = _rows(project), _rows(reference)
    assert len(want) == 2 and set(want['status']) == {'ok'}
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True))
    got, want = _saved(project), _saved(reference)
    assert got.keys() == want.keys() and len(want) >= 2, (got.keys(), want.keys())
    for path in want:
        assert got[path].keys() == want[path].keys()
        assert all(torch.equal(got[path][k], want[path][k]) for k in want[path]), path
    assert _checkpoints(project) == [], 'checkpoints of committed trials are removed'


def _epoch_of(path):
    try:
        return torch.load(path, weights_only=False)['epoch']
    except Exception:                  # replaced while being read: the next look sees it
        return 0


def test_a_sigkilled_halving_search_resumes_mid_rung_to_the_uninterrupted_answer(
        tmp_path, small_data):
    # Rung 1: both rates 2 epochs; the better one goes straight on to 6 (a rung of one). The
    # driver is killed during that last rung, from epoch 3 on (on a loaded machine the kill
    # may land after epoch 6 is saved and before its row: still a resume).
    halving = dict(LR_MIN=0.002, LR_MAX=0.003, STEP=0.001, WORKERS=1, SCHEDULER='halving',
                   HALVING_MIN_EPOCHS=2, HALVING_ETA=2, STAGE1_TARGET=100, AVOID_PARAM=0.0)
    reference, ref_proc = _reference(tmp_path, small_data, **halving)
    project = _project(tmp_path / 'killed', small_data, **halving)
    left, rows_at_kill = _kill_mid_trial(
        project, lambda found: any(_epoch_of(p) >= 3 for p in found))
    assert rows_at_kill == 2, 'rung 1 committed: one promoted, one stopped'
    rerun = run_script('train_multi.py', project)
    assert rerun.returncode == 0, output(rerun)[-3000:]
    assert re.search(r"AFNet lr=\S+ rung 2: ok.*\(resumed at epoch [3-6]\)", rerun.stdout), \
        rerun.stdout[-3000:]
    assert ref_proc.wait(timeout=240) == 0, (reference / 'run.log').read_text()[-3000:]
    ref_proc.log_file.close()
    assert 'resumed' not in (reference / 'run.log').read_text()
    got, want = _rows(project), _rows(reference)
    assert list(want['status']) == ['promoted', 'stopped', 'ok'] or \
        list(want['status']) == ['stopped', 'promoted', 'ok'], list(want['status'])
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True))
    got, want = _saved(project), _saved(reference)
    assert got.keys() == want.keys() and want
    for path in want:
        assert all(torch.equal(got[path][k], want[path][k]) for k in want[path]), path
    assert _checkpoints(project) == []


def test_stale_checkpoints_are_never_resumed_and_finished_trials_lose_theirs(tmp_path):
    temp = str(tmp_path / 'temp')
    mine, other = checkpoint_path(temp, 's1-aaaa', 'AFNet@0.003'), \
        checkpoint_path(temp, 's1-bbbb', 'AFNet@0.003')
    assert mine != other and os.path.isabs(mine) and mine.endswith('/s1-aaaa/AFNet_0.003/state.pt')
    running, stage_two = checkpoint_path(temp, 's1-aaaa', 'AFNet@0.002'), \
        checkpoint_path(temp, 's2-cccc', 'c1-f1')
    for path in (mine, other, running, stage_two):
        os.makedirs(os.path.dirname(path))
        Path(path).write_bytes(b'x')
    lines = []
    clean_checkpoints(temp, 's1-', 's1-aaaa', ['AFNet@0.003'], lines.append)
    # other settings' folder and the finished trial's go; the unfinished one and stage two's stay
    assert [os.path.exists(p) for p in (mine, other, running, stage_two)] == \
        [False, False, True, True]
    assert lines[0] == '  removed the trial checkpoints of other settings (s1-bbbb)'
    assert 'those trials resume mid-training' in lines[-1]
    clean_checkpoints(temp, 's1-', None, [], lines.append)            # RESUME=False
    assert not os.path.exists(running) and os.path.exists(stage_two)
