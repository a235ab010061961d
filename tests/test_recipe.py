"""The recipe levers: augmentation, normalisation inside the model, balanced class weights."""
import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import TinyNet
from public.compress.export import export_onnx
from public.model import AFNet, OptimizedAFNet
from public.train.recipe import Augmenter, add_normalization, class_weights
from public.search.stage_two import plan_candidates
from public.search.trial import run_trial
from public.train.outcome import TrialStatus


def _batch(n=8, c=1, length=1250, seed=0):
    return torch.randn(n, c, length, generator=torch.Generator().manual_seed(seed))


def test_augmentations_are_seeded_shape_preserving_and_change_the_signal():
    x = _batch(c=2)
    a, b = Augmenter(7, 'cpu')(x), Augmenter(7, 'cpu')(x)
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(Augmenter(8, 'cpu')(x), a)
    assert (a - x).abs().mean() > 0.01
    augment = Augmenter(7, 'cpu')
    assert not torch.equal(augment(x), augment(x)), 'a new draw per batch'


def test_the_time_shift_keeps_the_leads_of_a_recording_aligned():
    x = torch.zeros(16, 3, 1250)
    x[:, :, 600] = 10.0                                 # one spike, the same in every lead
    shifted = Augmenter(3, 'cpu', scale=(1, 1), noise=0.0, wander=0.0, shift=0.1)(x)
    peaks = shifted.argmax(dim=2)
    assert (peaks == peaks[:, :1]).all()                 # leads stay aligned
    assert len(set(peaks[:, 0].tolist())) > 4            # samples shifted differently
    assert ((peaks[:, 0] - 600).abs() <= 125).all()


def test_normalization_inside_the_model_makes_it_scale_and_offset_invariant():
    torch.manual_seed(0)
    model = add_normalization(OptimizedAFNet()).eval()
    x = _batch(4).unsqueeze(-1)
    with torch.no_grad():
        assert torch.allclose(model(x), model(3.0 * x + 2.0), atol=1e-4)


def test_onnx_of_a_normalizing_model_takes_the_raw_signal(tmp_path):
    torch.manual_seed(0)
    model = add_normalization(AFNet()).eval()
    path = str(tmp_path / 'n.onnx')
    export_onnx(model, path, 1, 1250, 18)
    raw = (50.0 * _batch(4) + 300.0).numpy()[..., None]          # raw units, offset
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    got = session.run(None, {session.get_inputs()[0].name: raw})[0]
    with torch.no_grad():
        expected = model(torch.from_numpy(raw)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)
    assert set(model.state_dict()) == set(AFNet().state_dict()), 'state dict keys unchanged'


def test_balanced_class_weights():
    y = torch.tensor([0, 0, 0, 1])
    assert torch.allclose(class_weights(y, 2), torch.tensor([4 / 6, 2.0]))
    assert class_weights(torch.tensor([0, 0, 2]), 3)[1] == 0


def test_a_trial_with_every_lever_on_trains_exports_and_checks(prepared, make_settings, tmp_path):
    settings = make_settings(AUGMENT=True, NORMALIZE='segment', CLASS_WEIGHTS='balanced',
                             NUM_EPOCHS=2)
    result = run_trial(lambda: TinyNet(), 0.003, prepared, settings, str(tmp_path / 't.onnx'),
                       progress=False)
    assert result.status == TrialStatus.OK, result.error
    off = run_trial(lambda: TinyNet(), 0.003, prepared, make_settings(NUM_EPOCHS=2),
                    str(tmp_path / 'u.onnx'), progress=False)
    assert any(not torch.equal(result.state_dict[k], off.state_dict[k]) for k in off.state_dict)


def test_stage_two_sizes_include_the_normalization(make_settings, prepared, tmp_path):
    settings = make_settings(NORMALIZE='segment', CHANNEL_SCALES=(1,), FC_SCALES=(1,))
    [plain] = plan_candidates(make_settings(CHANNEL_SCALES=(1,), FC_SCALES=(1,)), 1250, 1)
    [normed] = plan_candidates(settings, 1250, 1)
    assert normed.predicted_bytes > plain.predicted_bytes
    from public.search.stage_two import build_from_config
    result = run_trial(lambda: build_from_config(normed.config), 0.003, prepared, settings,
                       str(tmp_path / 'c.onnx'), progress=False)
    assert result.onnx_bytes == normed.predicted_bytes


def test_sepnet_fits_the_20_kb_budget_and_exports_matching_pytorch(tmp_path):
    from public.compress.export import like_trained
    from public.models.small import SepNet
    torch.manual_seed(0)
    model = like_trained(SepNet()).eval()
    path = str(tmp_path / 's.onnx')
    assert export_onnx(model, path, 1, 1250, 18) <= 20 * 1024
    x = _batch(3).numpy()[..., None]
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x})[0],
                                   model(torch.from_numpy(x)).numpy(), atol=1e-4, rtol=1e-3)
    assert SepNet(input_size=2500, in_channels=8, num_classes=4)(torch.zeros(2, 8, 2500, 1)).shape == (2, 4)


def test_best_folders_say_where_the_model_fails_per_subject(prepared, make_settings):
    import os
    import pandas as pd
    from public.core.interrupts import NoInterrupts
    from public.search.stage_one import result_folders, run_stage_one
    settings = make_settings()
    run_stage_one(settings, prepared, [TinyNet], NoInterrupts(), log=lambda m: None, progress=False)
    [folder] = result_folders(os.path.join(settings.MODEL_SAVE_PATH, 'TinyNet'))
    table = pd.read_csv(os.path.join(settings.MODEL_SAVE_PATH, 'TinyNet', folder, 'per_subject.csv'),
                        dtype={'subject': str})
    assert list(table.columns) == ['split', 'subject', 'segments', 'class_mix', 'f1', 'accuracy',
                                   'recall', 'precision', 'fbeta']
    val = table[table['split'] == 'val']
    assert sorted(val['subject']) == sorted(set(prepared.val_subjects.tolist()))
    assert val['segments'].sum() == len(prepared.trial.y_val)
    test = table[table['split'] == 'test']
    assert test['segments'].sum() == len(prepared.y_test)
    assert table['accuracy'].between(0, 1).all()
