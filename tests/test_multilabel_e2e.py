"""Seed 004 end to end: a 12-lead, 1000-sample multi-label .npz with strat_fold-style folds
(train 1-8, validate 9, test 10) through train_multi.py, train_final.py and predict.py, as
a user runs them (subprocesses in a project folder)."""
import json
import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest

from conftest import ROOT, run_script, settings_values, write_params
from multilabel_data import PTBXL_CLASSES, write_ptbxl_like_npz


@pytest.fixture(scope='module')
def project(tmp_path_factory, small_data):
    folder = tmp_path_factory.mktemp('ptbxl')
    write_ptbxl_like_npz(folder / 'all.npz', n=400, seed=0)
    d = dict(np.load(folder / 'all.npz'))
    test = d['fold'] == 10
    np.savez(folder / 'train.npz', **{k: v[~test] for k, v in d.items()})
    np.savez(folder / 'test.npz', **{k: v[test] for k, v in d.items()})
    values = settings_values(folder, small_data)
    values.update(DATA_DIR='train.npz', TEST_DIR='test.npz', INPUT_SIZE=1000,
                  LABEL_MODE='multilabel', CLASSES=PTBXL_CLASSES, VAL_FOLDS=(9,),
                  MODELS=('SepNet',), NUM_EPOCHS=3, LR_MIN=0.003, LR_MAX=0.003,
                  SELECT_METRIC='auc', MODEL_SAVE_PATH='multi-result', TEMP_DIR='temp',
                  AVOID_FILE_PATH='avoid.txt', FINAL_RESULT_DIR='final',
                  CHANNEL_SCALES=(3, 4), FC_SCALES=(2,), METRIC_TARGET=1, SIZE_TARGET_KB=500,
                  LEARNING_RATE=0.003)
    write_params(folder, **values)
    return folder


def test_stage_one_learns_every_label_and_reports_them(project):
    run = run_script('train_multi.py', project, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = pd.read_csv(project / 'multi-result' / 'results.csv')
    [row] = table.to_dict('records')
    assert row['status'] == 'ok'
    assert row['val_auc'] > 0.7 and row['test_auc'] > 0.7       # learnt, well above chance
    [best] = [f for f in os.listdir(project / 'multi-result' / 'SepNet') if '-' in f]
    folder = project / 'multi-result' / 'SepNet' / best
    info = json.loads((folder / 'result.json').read_text())
    for name in PTBXL_CLASSES:                                  # per-label figures
        assert 0 <= info['val_metrics'][f'{name}_f1'] <= 1
        assert f'{name}_auc' in info['test_metrics']
    text = (folder / 'evaluation_metrics.txt').read_text()
    assert 'Label NORM: F1 Score' in text and 'ROC AUC:' in text
    assert len(info['confusion']['val']) == len(PTBXL_CLASSES)  # a 2x2 matrix per label
    # xx-yy from the macro figures
    macro = [info['val_metrics'][m] for m in ('f1', 'accuracy', 'precision', 'recall')]
    assert best == f"{int(100 * max(macro) + 1e-9)}-{int(100 * min(macro) + 1e-9)}"


def test_stage_two_and_predict_give_per_label_probabilities(project):
    run = run_script('train_final.py', project, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    [result] = [f for f in os.listdir(project / 'final') if not f.startswith('.')]
    model = project / 'final' / result / 'saved.onnx'
    session = ort.InferenceSession(str(model), providers=['CPUExecutionProvider'])
    assert session.get_inputs()[0].shape[1:] == [12, 1000, 1]
    out = project / 'pred.csv'
    run = subprocess.run([sys.executable, str(ROOT / 'predict.py'), str(model), 'test.npz',
                          '--out', str(out)], cwd=str(project), capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    pred = pd.read_csv(out)
    assert list(pred.columns) == ['id', *PTBXL_CLASSES, 'label']      # + the labels at p >= 0.5
    probs = pred[list(PTBXL_CLASSES)].to_numpy()
    assert ((probs > 0) & (probs < 1)).all()
    assert not np.allclose(probs.sum(1), 1.0), 'independent sigmoids, not a softmax'
    y = np.load(project / 'test.npz')['y']
    assert len(pred) == len(y)
    from sklearn.metrics import roc_auc_score
    info = json.loads((project / 'final' / result / 'result.json').read_text())
    # predict.py's probabilities are the model's: they give the AUC stage two recorded
    # (from PyTorch; onnxruntime's float rounding may swap a near-tied pair: 1e-3)
    assert roc_auc_score(y, probs, average='macro') == pytest.approx(info['test_metrics']['auc'],
                                                                     abs=1e-3)
    assert info['test_metrics']['auc'] > 0.6
