"""REFIT: the chosen model retrained on every training subject and delivered, both stages.

The validation-chosen model decides everything (its metrics fill the tables' metric
columns); the refit model is what saved.onnx holds, its test metrics are recorded beside,
and the validation-chosen model stays in the folder as saved.val.onnx.
"""
import json
import os

import numpy as np
import onnxruntime as ort
import pandas as pd
import torch

from conftest import TinyNet
from public.core.interrupts import NoInterrupts
from public.results.table import ResultsTable, STAGE1_COLUMNS
from public.search.stage_one import result_folders, run_stage_one
from public.train.loop import refit_schedule
from public.train.outcome import TrialStatus


def _onnx_out(path, x):
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_refit_schedule_replays_the_validated_runs_learning_rates():
    history = [(1, .5, .6, 0.003), (2, .4, .5, 0.003), (3, .3, .5, 0.0015), (4, .2, .6, 0.0015)]
    assert refit_schedule(history, 0.003, 3) == [0.003, 0.003, 0.003]
    assert refit_schedule(history, 0.003, 4) == [0.003, 0.003, 0.003, 0.0015]
    assert refit_schedule(history, 0.003, 1) == [0.003]


def _job(settings, prepared, tmp_path, refit_above=0.0):
    from public.search.trial import TrialSpec, run_trial_job
    return run_trial_job(TrialSpec(key='TinyNet@0.003', build=TinyNet, lr=0.003, settings=settings,
                             refit_above=refit_above), prepared)


def test_a_refit_trial_trains_on_all_subjects_for_the_chosen_epochs(prepared, make_settings,
                                                                  tmp_path):
    settings = make_settings(NUM_EPOCHS=3, REFIT=True)
    result = _job(settings, prepared, tmp_path)
    assert result.status == TrialStatus.OK, result.error
    refit = result.refit
    assert refit['epochs'] == result.best_epoch >= 1
    assert set(refit['test_metrics']) >= {'f1', 'accuracy', 'precision', 'recall'}
    # the refit model is another model than the validation-chosen one, and its ONNX is it
    assert any(not torch.equal(refit['state_dict'][k], result.state_dict[k])
               for k in result.state_dict)
    (tmp_path / 'refit.onnx').write_bytes(refit['onnx'])
    model = TinyNet()
    model.load_state_dict(refit['state_dict'])
    x = prepared.x_test[:8].numpy()[..., None]
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_onnx_out(str(tmp_path / 'refit.onnx'), x), expected, atol=1e-4)
    assert 'model' not in refit and result.model is None, 'no model object goes back'
    # seeded: the same refit again gives the same weights
    again = _job(settings, prepared, tmp_path)
    assert all(torch.equal(again.refit['state_dict'][k], v) for k, v in refit['state_dict'].items())
    off = _job(make_settings(NUM_EPOCHS=3), prepared, tmp_path)
    assert off.refit is None
    assert off.val_metrics == result.val_metrics, 'REFIT does not change the validated trial'


def test_only_a_trial_that_can_become_the_best_is_refit(prepared, make_settings, tmp_path):
    from public.search.trial import deciding_score
    settings = make_settings(NUM_EPOCHS=2, REFIT=True)
    result = _job(settings, prepared, tmp_path, refit_above=0.0)
    score = deciding_score(result, settings)
    assert result.refit is not None
    assert _job(settings, prepared, tmp_path, refit_above=round(score, 6)).refit is not None
    assert _job(settings, prepared, tmp_path, refit_above=score + 0.01).refit is None


def test_stage_one_refits_only_trials_that_reach_the_models_best(prepared, make_settings):
    # Three learning rates: every trial whose score is below the best recorded before it
    # was dispatched is not refit; the best trial always is.
    settings = make_settings(NUM_EPOCHS=2, REFIT=True, LR_MIN=0.001, LR_MAX=0.003,
                             STEP=0.001)
    run_stage_one(settings, prepared, [TinyNet], NoInterrupts(), log=lambda m: None,
                  progress=False)
    rows = ResultsTable(os.path.join(settings.MODEL_SAVE_PATH, 'results.csv'),
                        STAGE1_COLUMNS).rows()
    assert len(rows) == 3
    best = float('-inf')
    for row in rows:                                  # serial: dispatched in table order
        score = float(row['score'])
        assert bool(row['refit']) == (score >= best - 1e-5), (row['lr'], score, best)
        best = max(best, score)


def _refit_stage_one(make_settings, prepared):
    """(settings, TinyNet's best folder) of a stage one with REFIT (one learning rate)."""
    settings = make_settings(NUM_EPOCHS=2, REFIT=True)
    run_stage_one(settings, prepared, [TinyNet], NoInterrupts(), log=lambda m: None,
                  progress=False)
    model_dir = os.path.join(settings.MODEL_SAVE_PATH, 'TinyNet')
    [name] = result_folders(model_dir)
    return settings, os.path.join(model_dir, name)


def test_stage_one_delivers_the_refit_model_and_says_so(prepared, make_settings):
    settings, folder = _refit_stage_one(make_settings, prepared)
    files = set(os.listdir(folder))
    assert {'saved.onnx', 'saved.pth', 'saved.val.onnx', 'saved.val.pth'} <= files
    info = json.load(open(os.path.join(folder, 'result.json')))
    refit_state = torch.load(os.path.join(folder, 'saved.pth'))
    val_state = torch.load(os.path.join(folder, 'saved.val.pth'))
    assert any(not torch.equal(refit_state[k], val_state[k]) for k in val_state)
    x = prepared.x_test[:8].numpy()[..., None]
    model = TinyNet().eval()
    model.load_state_dict(refit_state)
    with torch.no_grad():
        np.testing.assert_allclose(_onnx_out(os.path.join(folder, 'saved.onnx'), x),
                                   model(torch.from_numpy(x)).numpy(), atol=1e-4)
    text = open(os.path.join(folder, 'evaluation_metrics.txt')).read()
    assert 'ONNX file size: ' in text and 'saved.val.onnx' in text
    assert f"for {info['refit']['epochs']} epoch(s)" in text
    assert 'refit model (saved.onnx) test split:' in text
    [row] = ResultsTable(os.path.join(settings.MODEL_SAVE_PATH, 'results.csv'),
                         STAGE1_COLUMNS).rows()
    recorded = json.loads(row['refit'])
    assert recorded['epochs'] == info['refit']['epochs']
    assert recorded['test']['f1'] == round(info['refit']['test_metrics']['f1'], 6)
    subjects = pd.read_csv(os.path.join(folder, 'per_subject.csv'), dtype={'subject': str})
    assert set(subjects['split']) == {'val', 'test', 'test-refit'}


def test_stage_two_delivers_the_refit_model(prepared, make_settings):
    from public.search.stage_two import run_stage_two
    settings = make_settings(NUM_EPOCHS=2, REFIT=True, CHANNEL_SCALES=(1,), FC_SCALES=(1,),
                             METRIC_TARGET=1, SIZE_TARGET_KB=500)
    final, met, rows = run_stage_two(settings, prepared, NoInterrupts(), log=lambda m: None,
                                     progress=False)
    assert met and final
    files = set(os.listdir(final))
    assert {'saved.onnx', 'saved.val.onnx', 'saved.pth', 'saved.val.pth'} <= files
    info = json.load(open(os.path.join(final, 'result.json')))
    assert info['refit']['epochs'] >= 1 and info['refit']['test_metrics']
    assert json.loads(rows[0]['refit'])['epochs'] == info['refit']['epochs']


def test_a_refit_best_folder_is_rebuilt_whole_from_the_store(prepared, make_settings):
    # The best folder is derived: lost (e.g. a crash while it was replaced), the next start
    # rebuilds it from the store, with the refit and the validation-chosen models both.
    import shutil
    settings, folder = _refit_stage_one(make_settings, prepared)
    before = {f: open(os.path.join(folder, f), 'rb').read() for f in
              ('saved.onnx', 'saved.val.onnx', 'saved.pth', 'saved.val.pth')}
    shutil.rmtree(folder)
    run_stage_one(settings, prepared, [TinyNet], NoInterrupts(), log=lambda m: None,
                  progress=False)
    for f, blob in before.items():
        assert open(os.path.join(folder, f), 'rb').read() == blob, f
    assert 'saved.val.onnx' in open(os.path.join(folder, 'evaluation_metrics.txt')).read()
