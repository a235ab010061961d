"""The seed systems' data run end to end through train_multi.py, train_final.py and
predict.py: an 8-lead x 5000 .txt folder with slightly short segments (seed 002), and a
4-class Tianchi-style CSV with an unlabelled test CSV (seed 003)."""
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, cwd, *overrides, timeout=300):
    cmd = [sys.executable, os.path.join(ROOT, script)]
    if script != 'predict.py':
        cmd += ['--params', os.path.join(ROOT, 'params.py')]
    cmd += list(overrides)
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _common(tmp):
    return [f"CACHE_DIR={str(tmp / 'cache')!r}", f"MODEL_SAVE_PATH={str(tmp / 'multi-result')!r}",
            f"TEMP_DIR={str(tmp / 'temp')!r}", f"AVOID_FILE_PATH={str(tmp / 'avoid.txt')!r}",
            f"FINAL_RESULT_DIR={str(tmp / 'final')!r}", 'NUM_EPOCHS=2', 'LR_MIN=0.002',
            'LR_MAX=0.002', 'LATENCY_RUNS=5', 'AVOID_PARAM=0.0']


@pytest.fixture(scope='module')
def multilead(tmp_path_factory):
    """8-lead x 5000 segments, 6 subjects; some 4950..4999 long (padded), two too short."""
    root = tmp_path_factory.mktemp('seed002')
    rng = np.random.default_rng(0)
    for split, subjects in (('train', range(6)), ('test', range(10, 12))):
        folder = root / split
        folder.mkdir()
        for s in subjects:
            for i in range(4):
                label = 'AFIB' if i % 2 else 'N'
                length = 5000 if i else int(rng.integers(4950, 5000))
                signal = rng.standard_normal((length, 8)) * (0.2 if label == 'N' else 1.0)
                np.savetxt(folder / f"S{s}-{label}-{i}.txt", signal, fmt='%.3f')
        if split == 'train':
            np.savetxt(folder / 'S0-N-90.txt', rng.standard_normal((4000, 8)), fmt='%.3f')
            np.savetxt(folder / 'S1-AFIB-91.txt', rng.standard_normal((4900, 8)), fmt='%.3f')
    return root


@pytest.fixture(scope='module')
def tianchi(tmp_path_factory):
    """A 4-class heartbeat CSV (205 values per row) and an unlabelled test CSV."""
    root = tmp_path_factory.mktemp('seed003')
    rng = np.random.default_rng(1)

    def rows(n, start):
        labels = np.arange(n) % 4
        t = np.linspace(0, 1, 205)
        signals = [np.sin(2 * np.pi * (k + 1) * t) + 0.1 * rng.standard_normal(205) for k in labels]
        return pd.DataFrame({'id': np.arange(start, start + n),
                             'heartbeat_signals': [','.join(f"{v:.4f}" for v in s) for s in signals],
                             'label': labels.astype(float)})
    rows(96, 0).to_csv(root / 'train.csv', index=False)
    test = rows(32, 100000)
    test.to_csv(root / 'test_labelled.csv', index=False)
    test.drop(columns='label').to_csv(root / 'testA.csv', index=False)
    return root


def test_multilead_folder_through_both_stages_and_predict(multilead, tmp_path):
    common = _common(tmp_path) + [f"DATA_DIR={str(multilead / 'train')!r}",
                                  f"TEST_DIR={str(multilead / 'test')!r}", 'INPUT_SIZE=5000',
                                  'PAD_TOLERANCE=50', "SHORTER='exclude'",
                                  "MODELS=('OptimizedAFNet', 'SEResNet1d')",
                                  "SELECT_METRIC='auc'"]
    one = _run('train_multi.py', tmp_path, *common)
    assert one.returncode == 0, one.stdout + one.stderr
    assert '8 lead(s)' in one.stdout
    assert 'excluded 2 segment(s)' in one.stdout
    table = pd.read_csv(tmp_path / 'multi-result' / 'results.csv')
    assert list(table['model']) == ['OptimizedAFNet', 'SEResNet1d']
    assert (table['status'] == 'ok').all() and table['val_auc'].notna().all()
    two = _run('train_final.py', tmp_path, *common, 'CHANNEL_SCALES=(1,)', 'FC_SCALES=(1,)',
               'SIZE_TARGET_KB=1000', 'METRIC_TARGET=1')
    assert two.returncode == 0, two.stdout + two.stderr
    [final] = os.listdir(tmp_path / 'final')
    onnx = tmp_path / 'final' / final / 'saved.onnx'
    out = tmp_path / 'pred.csv'
    pred = _run('predict.py', tmp_path, str(onnx), str(multilead / 'test'), '--out', str(out),
                '--pad-tolerance', '50')
    assert pred.returncode == 0, pred.stdout + pred.stderr
    probs = pd.read_csv(out)
    assert list(probs.columns) == ['id', 'label_0', 'label_1', 'label'] and len(probs) == 8
    assert np.allclose(probs[['label_0', 'label_1']].sum(axis=1), 1, atol=1e-4)


def test_four_class_csv_through_both_stages_and_predict(tianchi, tmp_path):
    common = _common(tmp_path) + [f"DATA_DIR={str(tianchi / 'train.csv')!r}",
                                  f"TEST_DIR={str(tianchi / 'test_labelled.csv')!r}",
                                  'INPUT_SIZE=205', 'CLASSES=(0, 1, 2, 3)',
                                  "SELECT_METRIC='abs_sum'", "MODELS=('OptimizedAFNet',)"]
    one = _run('train_multi.py', tmp_path, *common, 'NUM_EPOCHS=3')
    assert one.returncode == 0, one.stdout + one.stderr
    row = pd.read_csv(tmp_path / 'multi-result' / 'results.csv').iloc[0]
    assert row['status'] == 'ok' and row['select_metric'] == 'abs_sum'
    assert 0 <= row['val_abs_sum'] <= 2
    assert row['score'] == pytest.approx(1 - row['val_abs_sum'] / 2, abs=1e-5)
    two = _run('train_final.py', tmp_path, *common, 'CHANNEL_SCALES=(1, 2)', 'FC_SCALES=(1,)',
               'SIZE_TARGET_KB=100', 'METRIC_TARGET=1')
    assert two.returncode == 0, two.stdout + two.stderr
    [final] = os.listdir(tmp_path / 'final')
    onnx = tmp_path / 'final' / final / 'saved.onnx'
    out = tmp_path / 'submit.csv'
    pred = _run('predict.py', tmp_path, str(onnx), str(tianchi / 'testA.csv'), '--out',
                str(out), '--snap')
    assert pred.returncode == 0, pred.stdout + pred.stderr
    submit = pd.read_csv(out)
    assert list(submit.columns) == ['id', 'label_0', 'label_1', 'label_2', 'label_3', 'label']
    assert list(submit['id']) == list(range(100000, 100032))
    values = submit[['label_0', 'label_1', 'label_2', 'label_3']].to_numpy()
    assert (((values == 0) | (values == 1) | ((values >= 0.1) & (values <= 0.9)))).all()


def test_unlabelled_test_csv_is_refused_for_evaluation(tianchi, tmp_path):
    run = _run('train_multi.py', tmp_path, *_common(tmp_path),
               f"DATA_DIR={str(tianchi / 'train.csv')!r}", f"TEST_DIR={str(tianchi / 'testA.csv')!r}",
               'INPUT_SIZE=205', 'CLASSES=(0, 1, 2, 3)', "MODELS=('OptimizedAFNet',)")
    assert run.returncode == 2
    assert 'testA.csv: test data has no labels' in run.stdout


def _fold_settings(tmp_path, data, **extra):
    from public.core.settings import load_settings
    values = dict(DATA_DIR=str(data), TEST_DIR='', INPUT_SIZE=100, CACHE_DIR=str(tmp_path / 'c'),
                  **extra)
    return load_settings([f"{k}={v!r}" for k, v in values.items()],
                         params_path=os.path.join(ROOT, 'params.py'))


@pytest.mark.parametrize('kind', ['npz', 'csv'])
def test_predefined_folds_drive_the_validation_split(tmp_path, kind):
    """PTB-XL style: VAL_FOLDS picks validation by the data's fold column, not by subject."""
    from public.data.prepare import prepare_data
    rng = np.random.default_rng(2)
    n = 60
    x = rng.standard_normal((n, 100)).astype(np.float32)
    y = np.arange(n) % 2
    fold = np.arange(n) % 10 + 1
    if kind == 'npz':
        path = tmp_path / 'ptbxl.npz'
        np.savez(path, x=x, y=y, fold=fold, subject=np.arange(n) // 3)
    else:
        path = tmp_path / 'ptbxl.csv'
        pd.DataFrame({'id': np.arange(n), 'fold': fold, 'label': y,
                      'heartbeat_signals': [','.join(f"{v:.4f}" for v in row) for row in x]}
                     ).to_csv(path, index=False)
    data = prepare_data(_fold_settings(tmp_path, path, VAL_FOLDS=(9, 10),
                                       POSITIVE_LABELS=('1',)), progress=False)
    assert len(data.trial.x_val) == 12 and len(data.trial.x_train) == 48
    with pytest.raises(Exception, match=r"VAL_FOLDS=\(11,\) leaves no validation"):
        prepare_data(_fold_settings(tmp_path, path, VAL_FOLDS=(11,), POSITIVE_LABELS=('1',)),
                     progress=False)


def test_val_folds_without_fold_data_is_a_clear_error(tmp_path):
    from public.dataset import DataError
    from public.data.prepare import prepare_data
    path = tmp_path / 'nofold.npz'
    np.savez(path, x=np.zeros((8, 100), np.float32), y=np.arange(8) % 2)
    with pytest.raises(DataError, match='VAL_FOLDS is set but the data has no fold'):
        prepare_data(_fold_settings(tmp_path, path, VAL_FOLDS=(9,), POSITIVE_LABELS=('1',)),
                     progress=False)
