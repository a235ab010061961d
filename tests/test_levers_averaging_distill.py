"""The recipe levers of issue 20 (public/train/loop.py, distill.py, search/teacher.py): weight
averaging (WEIGHT_AVERAGING='ema' / 'swa'), the cosine schedule (LR_SCHEDULE='cosine') and
distillation from a stage-one result (DISTILL_FROM, DISTILL_TEMPERATURE, DISTILL_WEIGHT).
Real training on tiny data: the averages are checked against hand-computed ones, resumes
against uninterrupted runs, distillation against plain training."""
import dataclasses
import math
import os

import numpy as np
import pytest
import torch

from conftest import PARAMS, TinyNet, TinyNetB, interrupt_after
from public.compress.export import check_onnx, export_onnx
from public.core.errors import SettingsError
from public.core.interrupts import NoInterrupts
from public.core.settings import load_settings
from public.data.prepare import TrialData, on_device, prepare_data
from public.search.stage_one import read_summary, recommended_pick, run_stage_one
from public.search.trial import run_trial
from public.train import distill, loop
from public.search import teacher as teaching
from public.search.teacher import attach_teacher, teacher_logits, teacher_onnx
from public.train.distill import DistillLoss
from public.train.outcome import TrialStatus
from public.train.loop import WeightAverager, swa_start_epoch, train_model

CPU = torch.device('cpu')
LENGTH = 64


def _data(n_train=96, n_val=48, seed=0, teacher=None):
    g = np.random.default_rng(seed)
    return TrialData(torch.from_numpy(g.standard_normal((n_train, 1, LENGTH)).astype(np.float32)),
                     torch.from_numpy(g.integers(0, 2, n_train)),
                     torch.from_numpy(g.standard_normal((n_val, 1, LENGTH)).astype(np.float32)),
                     torch.from_numpy(g.integers(0, 2, n_val)),
                     teacher_logits=teacher, teacher_id='t' if teacher is not None else '')


def _settings(**kw):
    base = dict(WEIGHT_DECAY=1e-3, PATIENCE=5, OVERFIT_GAP=0.0, SEED=3, NUM_EPOCHS=8,
                BATCH_SIZE=16, AUGMENT=True, CLASS_WEIGHTS='balanced')
    return load_settings([f"{k}={v!r}" for k, v in {**base, **kw}.items()],
                         params_path=str(PARAMS))


def _model():
    torch.manual_seed(0)
    return TinyNet(input_size=LENGTH)


def _run(settings, data=None, checkpoint=None, budget=0, lr=0.01, model=None):
    model = model or _model()
    outcome = train_model(model, data or _data(), lr, settings, CPU, progress=False,
                          checkpoint=checkpoint, budget=budget)
    return outcome, model


def _assert_same(a, b):
    assert a.state_dict.keys() == b.state_dict.keys()
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k]), k
    assert (a.history, a.epochs, a.best_epoch, a.stop_reason) == \
        (b.history, b.epochs, b.best_epoch, b.stop_reason)


def _assert_close(state, expected, keys=None):
    for k in keys or expected:
        assert torch.allclose(state[k].float(), expected[k].float(), atol=1e-6, rtol=1e-5), k


# ----------------------------------------------------------------------------- averaging

def _recording(monkeypatch, method):
    """Record (epoch or step count, model state) each time WeightAverager.<method> runs."""
    real, seen = getattr(WeightAverager, method), []

    def record(self, model, *args):
        seen.append(({k: v.clone() for k, v in model.state_dict().items()}, args))
        return real(self, model, *args)
    monkeypatch.setattr(WeightAverager, method, record)
    return seen


def test_ema_is_the_hand_computed_moving_average_of_every_step(monkeypatch):
    settings = _settings(WEIGHT_AVERAGING='ema', NUM_EPOCHS=2, PATIENCE=50, AUGMENT=False)
    initial = {k: v.clone() for k, v in _model().state_dict().items()}
    steps = _recording(monkeypatch, 'after_step')
    outcome, model = _run(settings)
    assert len(steps) == 2 * 6                      # 96 segments / 16 per batch, two epochs
    per_epoch = len(steps) // 2
    ema = {k: v.clone().double() for k, v in initial.items()}
    averages = []
    for t, (state, _) in enumerate(steps):
        decay = min(loop.EMA_DECAY, (1 + t) / (10 + t))
        for k, v in state.items():
            ema[k] = decay * ema[k] + (1 - decay) * v.double() if v.is_floating_point() else v
        if (t + 1) % per_epoch == 0:
            averages.append({k: v.clone() for k, v in ema.items()})
    expected = averages[outcome.best_epoch - 1]
    _assert_close(outcome.state_dict, expected)      # parameters and BatchNorm statistics
    plain = steps[outcome.best_epoch * per_epoch - 1][0]
    assert not torch.allclose(outcome.state_dict['fc.weight'], plain['fc.weight'])
    # what it validated is the average: the history's val loss is the averaged model's
    check = TinyNet(input_size=LENGTH)
    check.load_state_dict(outcome.state_dict)
    val = loop._mean_loss(check, _data().x_val, _data().y_val,
                          loop.make_criterion(settings, _data().y_train, 2))
    assert val == pytest.approx(outcome.history[outcome.best_epoch - 1][2], abs=1e-6)


def test_swa_is_the_equal_average_of_the_last_epochs_with_batchnorm_recomputed(monkeypatch):
    settings = _settings(WEIGHT_AVERAGING='swa', NUM_EPOCHS=6, PATIENCE=50)
    assert swa_start_epoch(6) == 3 and swa_start_epoch(1) == 0
    epochs = _recording(monkeypatch, 'after_epoch')
    outcome, model = _run(settings)
    assert [args[0] for _, args in epochs] == [1, 2, 3, 4, 5, 6]
    assert outcome.best_epoch > 3, 'SWA chooses its best among the averaged epochs'
    averaged = [s for s, (epoch,) in epochs if 3 < epoch <= outcome.best_epoch]
    params = [k for k, _ in model.named_parameters()]
    expected = {k: torch.stack([s[k] for s in averaged]).mean(0) for k in params}
    _assert_close(outcome.state_dict, expected, params)
    assert not torch.allclose(outcome.state_dict['conv.weight'], averaged[-1]['conv.weight'])
    # BatchNorm statistics are those of the averaged weights on the training data
    x = _data().x_train.unsqueeze(-1)
    with torch.no_grad():
        features = model.conv(x.squeeze(-1))               # model holds the averaged weights
    assert torch.allclose(outcome.state_dict['bn.running_mean'], features.mean(dim=(0, 2)),
                          atol=1e-5)


@pytest.mark.parametrize('kind', ['ema', 'swa'])
def test_averaged_models_keep_keys_and_shapes_and_export_exactly(tmp_path, kind):
    outcome, model = _run(_settings(WEIGHT_AVERAGING=kind, NUM_EPOCHS=4, PATIENCE=50))
    plain = TinyNet(input_size=LENGTH).state_dict()
    assert list(outcome.state_dict) == list(plain)
    assert all(outcome.state_dict[k].shape == v.shape and outcome.state_dict[k].dtype == v.dtype
               for k, v in plain.items())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in outcome.state_dict.items()), \
        'the model is left with the averaged weights'
    path = str(tmp_path / 'saved.onnx')
    export_onnx(model, path, 1, LENGTH, 18)
    check_onnx(path, model, _data().x_val[:16].numpy())     # onnxruntime == torch


def _interrupted(settings, checkpoint, after, monkeypatch, data=None):
    """Run until `after` epochs are done, then Ctrl+C (KeyboardInterrupt) in the next one."""
    interrupt_after(monkeypatch, after, lambda: _run(settings, data, checkpoint), checkpoint)


@pytest.mark.parametrize('levers,after', [
    (dict(WEIGHT_AVERAGING='ema'), 3),
    (dict(WEIGHT_AVERAGING='swa'), 2),               # before the averaging starts (epoch 5)
    (dict(WEIGHT_AVERAGING='swa', LR_SCHEDULE='cosine'), 5),   # inside the averaging
    (dict(DISTILL_FROM='teacher/99-99'), 3),
])
def test_an_interrupted_trial_with_a_lever_resumes_to_exactly_the_uninterrupted_result(
        tmp_path, monkeypatch, levers, after):
    settings = _settings(PATIENCE=50, **levers)
    data = _data(teacher=torch.randn(96, 2, generator=torch.Generator().manual_seed(5))
                 if 'DISTILL_FROM' in levers else None)
    uninterrupted, _ = _run(settings, data)
    path = str(tmp_path / 'state.pt')
    _interrupted(settings, path, after, monkeypatch, data)
    torch.manual_seed(1234)                # RNG states moved on by something else in between
    np.random.seed(99)
    resumed, _ = _run(settings, data, checkpoint=path)
    assert resumed.resumed_at == after and uninterrupted.epochs > after + 1
    _assert_same(resumed, uninterrupted)


def test_a_rung_continued_equals_an_uninterrupted_run_with_cosine_and_swa(tmp_path):
    settings = _settings(WEIGHT_AVERAGING='swa', LR_SCHEDULE='cosine', PATIENCE=50)
    uninterrupted, _ = _run(settings)
    path = str(tmp_path / 'state.pt')
    rung, _ = _run(settings, checkpoint=path, budget=3)
    assert rung.stop_reason == loop.STOP_BUDGET and rung.epochs == 3
    assert [h[3] for h in rung.history] == [h[3] for h in uninterrupted.history[:3]]
    final, _ = _run(settings, checkpoint=path)
    assert final.resumed_at == 3
    _assert_same(final, uninterrupted)


def test_a_checkpoint_of_other_levers_is_not_resumed(tmp_path, monkeypatch):
    path = str(tmp_path / 'state.pt')
    _interrupted(_settings(WEIGHT_AVERAGING='ema'), path, 2, monkeypatch)
    assert _run(_settings(WEIGHT_AVERAGING='swa'), checkpoint=path)[0].resumed_at == 0


# ----------------------------------------------------------------------------- cosine

def test_cosine_schedule_anneals_over_num_epochs_per_epoch():
    lr, n = 0.01, 8
    outcome, _ = _run(_settings(LR_SCHEDULE='cosine', NUM_EPOCHS=n, PATIENCE=50), lr=lr)
    assert len(outcome.history) == n
    # the history's lr is the one set after epoch e: the rate epoch e + 1 trains at
    for epoch, _, _, rate in outcome.history:
        assert rate == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * epoch / n)), rel=1e-9)
    plateau, _ = _run(_settings(NUM_EPOCHS=n, PATIENCE=50), lr=lr)
    assert plateau.history[0][3] == lr


# ----------------------------------------------------------------------------- distillation

def test_distill_loss_is_the_weighted_sum_of_task_and_tempered_kl():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
    y = torch.randint(0, 3, (8,), generator=g)
    task = torch.nn.CrossEntropyLoss()
    loss, plain = DistillLoss(task, 2.0, 0.3)(student, y, teacher)
    p_t = torch.softmax(teacher / 2, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(student / 2, 1))).sum(1).mean()
    assert plain == task(student, y)
    assert loss == pytest.approx(float(0.7 * task(student, y) + 0.3 * 4 * kl), rel=1e-6)
    assert DistillLoss(task, 4.0, 1.0)(student, y, student)[0] == pytest.approx(0, abs=1e-6)


def _teacher_folder(root, num_classes=2, seed=7):
    folder = root / 'multi-result' / 'TinyNet' / '90-80'
    folder.mkdir(parents=True)
    torch.manual_seed(seed)
    model = TinyNet(input_size=LENGTH, num_classes=num_classes)
    export_onnx(model, str(folder / 'saved.onnx'), 1, LENGTH, 18)
    return folder, model.eval()


def test_teacher_logits_are_computed_once_and_cached_on_disk(tmp_path, monkeypatch):
    folder, model = _teacher_folder(tmp_path)
    settings = _settings(DISTILL_FROM=str(folder), CACHE_DIR=str(tmp_path / 'cache'))
    x = _data().x_train
    logits, sha, note = teacher_logits(settings, x, 2)
    with torch.no_grad():
        assert torch.allclose(logits, model(x.unsqueeze(-1)), atol=1e-5)
    cached = list((tmp_path / 'cache' / 'teacher').glob('*.npy'))
    assert len(cached) == 1 and 'computed' in note and sha == teaching._sha256(
        str(folder / 'saved.onnx'))
    import public.compress.export as export
    monkeypatch.setattr(teaching, 'onnx_predict', lambda *a, **k: pytest.fail('teacher ran again'))
    again, sha2, note2 = teacher_logits(settings, x, 2)
    assert torch.equal(again, logits) and sha2 == sha and 'from cache' in note2
    # other training data: another cache entry (the key holds the data's fingerprint)
    monkeypatch.undo()
    teacher_logits(settings, x[:50], 2)
    assert len(list((tmp_path / 'cache' / 'teacher').glob('*.npy'))) == 2


def test_the_settings_key_follows_the_teacher_file_not_just_the_setting(tmp_path):
    """Rows trained against one teacher are not reused when DISTILL_FROM (same string, or
    'auto') now names another saved.onnx; the same file gives the same key."""
    import shutil
    import pandas as pd
    from public.results.keys import settings_key
    folder, _ = _teacher_folder(tmp_path / 'a')
    save = tmp_path / 'a' / 'multi-result'
    plain = settings_key(_settings(DISTILL_FROM=str(folder)))
    assert plain != settings_key(_settings())
    shutil.copytree(folder, tmp_path / 'copy')       # the same bytes elsewhere: another string
    assert settings_key(_settings(DISTILL_FROM=str(tmp_path / 'copy'))) != plain
    (folder / 'saved.onnx').write_bytes((folder / 'saved.onnx').read_bytes())
    assert settings_key(_settings(DISTILL_FROM=str(folder))) == plain     # unchanged bytes
    _teacher_folder(tmp_path / 'b', seed=8)                               # other weights ...
    shutil.copy(tmp_path / 'b' / 'multi-result' / 'TinyNet' / '90-80' / 'saved.onnx',
                folder / 'saved.onnx')                                    # ... at the same path
    assert settings_key(_settings(DISTILL_FROM=str(folder))) != plain
    # 'auto': the key follows summary.csv's pick; no pick yet: the bare value
    auto = dict(DISTILL_FROM='auto', MODEL_SAVE_PATH=str(save))
    before = settings_key(_settings(**auto))
    pd.DataFrame([dict(model='TinyNet', best_lr='0.003', score=0.9, onnx_kb=1.0,
                       result='90-80')]).to_csv(save / 'summary.csv', index=False)
    picked = settings_key(_settings(**auto))
    assert picked != before
    shutil.copy(tmp_path / 'copy' / 'saved.onnx', folder / 'saved.onnx')
    assert settings_key(_settings(**auto)) != picked          # the pick's file changed


def test_distillation_errors_name_the_setting_the_value_and_the_rule(tmp_path):
    missing = str(tmp_path / 'nowhere')
    with pytest.raises(SettingsError, match=r"DISTILL_FROM='.*nowhere': folder .* not found; "
                                            r"DISTILL_FROM must be ''"):
        teacher_onnx(_settings(DISTILL_FROM=missing))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(SettingsError, match=r"has no saved.onnx; DISTILL_FROM must be"):
        teacher_onnx(_settings(DISTILL_FROM=str(tmp_path / 'empty')))
    with pytest.raises(SettingsError, match=r"DISTILL_FROM='auto' .* lists no trained model"):
        teacher_onnx(_settings(DISTILL_FROM='auto', MODEL_SAVE_PATH=str(tmp_path / 'none')))
    folder, _ = _teacher_folder(tmp_path / 'three', num_classes=3)
    with pytest.raises(SettingsError, match=r"outputs of shape \(3,\) .* 2 classes"):
        teacher_logits(_settings(DISTILL_FROM=str(folder), CACHE_DIR=str(tmp_path / 'c')),
                       _data().x_train, 2)
    with pytest.raises(SettingsError, match=r"command line: DISTILL_FROM='x' and REFIT=True"):
        _settings(DISTILL_FROM='x', REFIT=True)
    with pytest.raises(SettingsError, match=r"needs LABEL_MODE='multiclass'"):
        _settings(DISTILL_FROM='x', LABEL_MODE='multilabel', CLASSES=('A', 'B'))
    assert teacher_onnx(_settings()) is None


def test_distillation_weight_zero_is_plain_training_and_the_teacher_changes_the_result():
    teacher = torch.randn(96, 2, generator=torch.Generator().manual_seed(5)) * 3
    plain, _ = _run(_settings(NUM_EPOCHS=3))
    zero, _ = _run(_settings(NUM_EPOCHS=3, DISTILL_FROM='t', DISTILL_WEIGHT=0.0),
                   _data(teacher=teacher))
    _assert_same(zero, plain)
    taught, _ = _run(_settings(NUM_EPOCHS=3, DISTILL_FROM='t'), _data(teacher=teacher))
    other, _ = _run(_settings(NUM_EPOCHS=3, DISTILL_FROM='t'), _data(teacher=-teacher))
    assert not torch.equal(taught.state_dict['fc.weight'], plain.state_dict['fc.weight'])
    assert not torch.equal(taught.state_dict['fc.weight'], other.state_dict['fc.weight'])
    # the reported losses are the task's: validation loss is not the distilled one
    assert len(taught.history) == 3 and all(math.isfinite(h[2]) for h in taught.history)


def test_teacher_logits_travel_with_the_data_to_the_device(prepared):
    trial = dataclasses.replace(prepared.trial, teacher_logits=torch.zeros(3, 2))
    moved = on_device(dataclasses.replace(prepared, trial=trial, device=torch.device('meta')))
    assert moved.trial.teacher_logits.device.type == 'meta'
    assert moved.trial.x_train.device.type == 'meta'


def test_auto_distils_from_the_best_stage_one_folder(make_settings, prepared):
    settings = make_settings(LR_MIN=0.002, LR_MAX=0.004, STEP=0.002)
    run_stage_one(settings, prepared, [TinyNet, TinyNetB], NoInterrupts(), log=lambda m: None,
                  progress=False)
    rows = read_summary(os.path.join(settings.MODEL_SAVE_PATH, 'summary.csv'))
    pick = recommended_pick(rows)
    best = max((r for r in rows if r.get('score') == r.get('score')),
               key=lambda r: (r['score'], -r['onnx_kb']))
    assert pick['model'] == best['model']
    auto = make_settings(DISTILL_FROM='auto', LR_MIN=0.003, LR_MAX=0.003)
    path = teacher_onnx(auto)
    assert path == os.path.join(best['folder'], 'saved.onnx') and os.path.isfile(path)
    data = prepare_data(auto, progress=False)
    said = []
    attach_teacher(auto, data, said.append)
    assert data.trial.teacher_logits.shape == (len(data.trial.x_train), 2)
    assert 'distillation: teacher' in said[0] and data.trial.teacher_id
    taught = run_trial(lambda: TinyNet(), 0.003, data, auto, str(prepared_path(auto)),
                       progress=False, latency=False)
    plain = run_trial(lambda: TinyNet(), 0.003, prepared, settings, str(prepared_path(settings)),
                      progress=False, latency=False)
    assert taught.status == plain.status == TrialStatus.OK, (taught.error, plain.error)
    assert not torch.equal(taught.state_dict['fc.weight'], plain.state_dict['fc.weight'])


def prepared_path(settings):
    return os.path.join(settings.TEMP_DIR, 'trial.onnx')


def test_refit_training_ends_with_the_average_as_the_validated_run(monkeypatch):
    settings = _settings(WEIGHT_AVERAGING='swa', NUM_EPOCHS=6)
    epochs = _recording(monkeypatch, 'after_epoch')
    data = _data()
    model = _model()
    loop.train_fixed(model, data.x_train, data.y_train, [0.01] * 5, settings, CPU,
                     progress=False)
    params = [k for k, _ in model.named_parameters()]
    expected = {k: torch.stack([s[k] for s, (e,) in epochs if e > 3]).mean(0) for k in params}
    _assert_close(model.state_dict(), expected, params)
    plain = _model()
    loop.train_fixed(plain, data.x_train, data.y_train, [0.01] * 5, _settings(NUM_EPOCHS=6),
                     CPU, progress=False)
    assert not torch.allclose(plain.state_dict()['fc.weight'], model.state_dict()['fc.weight'])
