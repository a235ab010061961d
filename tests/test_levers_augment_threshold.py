"""Issue 20's levers: AUGMENT's named augmentations (polarity flip, stronger noise) and
CALIBRATE_THRESHOLD (the decision threshold chosen on validation, folded into the bias)."""
import copy
import math

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch
from torch import nn

import predict
from conftest import TinyNet
from public.core.settings import SettingsError, augment_levels
from public.results.keys import settings_key
from public.search.trial import run_trial
from public.train.metrics import binary_metrics, selection_score
from public.train.outcome import TrialStatus
from public.train.recipe import SAMPLE_RATE_HZ, Augmenter
from public.train.threshold import (candidate_thresholds, fold_threshold, pick_threshold,
                                    threshold_logit, threshold_scores)


def _batch(n=8, c=1, length=1250, seed=0):
    return torch.randn(n, c, length, generator=torch.Generator().manual_seed(seed))


class _OldAugmenter:
    """public/train/recipe.py's Augmenter as it was before AUGMENT took names (verbatim)."""

    def __init__(self, seed, device, scale=(0.8, 1.2), noise=0.05, wander=0.1,
                 wander_hz=(0.05, 0.5), shift=0.1):
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.scale, self.noise, self.wander = scale, noise, wander
        self.wander_hz, self.shift = wander_hz, shift

    def _uniform(self, shape, low, high, like):
        return low + (high - low) * torch.rand(shape, generator=self.generator,
                                               device=like.device, dtype=like.dtype)

    def __call__(self, x):
        n, c, length = x.shape
        std = x.std(dim=2, keepdim=True).clamp_min(1e-6)
        out = x * self._uniform((n, c, 1), *self.scale, x)
        out = out + self.noise * std * torch.randn(x.shape, generator=self.generator,
                                                   device=x.device, dtype=x.dtype)
        t = torch.arange(length, device=x.device, dtype=x.dtype) / SAMPLE_RATE_HZ
        freq = self._uniform((n, c, 1), *self.wander_hz, x)
        phase = self._uniform((n, c, 1), 0.0, 2 * torch.pi, x)
        out = out + self.wander * std * torch.sin(2 * torch.pi * freq * t + phase)
        max_shift = int(self.shift * length)
        if max_shift:
            offsets = torch.randint(-max_shift, max_shift + 1, (n, 1, 1),
                                    generator=self.generator, device=x.device)
            index = (torch.arange(length, device=x.device) - offsets) % length
            out = torch.gather(out, 2, index.expand(n, c, length))
        return out


# ----------------------------------------------------------------------------- AUGMENT

def test_augment_true_draws_exactly_what_it_drew_before():
    torch.manual_seed(0)
    x1, x3 = torch.randn(8, 1, 300), torch.randn(5, 3, 200) * 2 + 1
    new, old = Augmenter(42, 'cpu'), _OldAugmenter(42, 'cpu')
    for x in (x1, x3, x1):                                # three batches: the stream too
        assert torch.equal(new(x), old(x))
    assert torch.equal(new.generator.get_state(), old.generator.get_state())
    # the values this seed gave before the change (captured from the old code)
    got = Augmenter(42, 'cpu', True)(x1)
    assert got.double().sum().item() == pytest.approx(65.98330079950392, abs=1e-6)
    np.testing.assert_allclose(got[0, 0, :3].numpy(), [-0.612494, 1.539343, -1.187136],
                               atol=1e-6)
    # keyword levels (tests/test_recipe.py's) still apply to True
    a = Augmenter(3, 'cpu', scale=(1, 1), noise=0.0, wander=0.0, shift=0.1)(x3)
    b = _OldAugmenter(3, 'cpu', scale=(1, 1), noise=0.0, wander=0.0, shift=0.1)(x3)
    assert torch.equal(a, b)


def test_the_four_of_true_named_draw_what_true_draws_in_any_order():
    x = _batch(c=2)
    ref = Augmenter(5, 'cpu', True)(x)
    for names in (('scale', 'noise', 'wander', 'shift'), ['shift', 'wander', 'noise', 'scale'],
                  ('scale', 'noise=0.05', 'wander=0.1', 'shift=0.1')):
        assert torch.equal(Augmenter(5, 'cpu', names)(x), ref), names
    assert torch.equal(Augmenter(5, 'cpu', False)(x), x)


def test_flip_inverts_about_half_the_segments_all_leads_together_seeded():
    x = _batch(n=400, c=3, length=64) + 0.1
    out = Augmenter(11, 'cpu', ('flip',))(x)
    flipped = torch.isclose(out, -x).all(dim=2)            # (N, C)
    kept = torch.isclose(out, x).all(dim=2)
    assert (flipped | kept).all()
    assert (flipped == flipped[:, :1]).all(), 'the leads of a segment flip together'
    share = flipped[:, 0].float().mean().item()
    assert 0.4 < share < 0.6                               # p = 0.5 on 400 segments
    assert torch.equal(Augmenter(11, 'cpu', ('flip',))(x), out)           # seeded
    assert not torch.equal(Augmenter(12, 'cpu', ('flip',))(x), out)
    rare = torch.isclose(Augmenter(11, 'cpu', ('flip=0.1',))(x), -x).all(dim=2)[:, 0]
    assert 0.03 < rare.float().mean().item() < 0.2
    # appended to True's four: the four draw as before, then the signs
    both = Augmenter(11, 'cpu', ('scale', 'noise', 'wander', 'shift', 'flip'))(x)
    base = Augmenter(11, 'cpu', True)(x)
    assert (torch.isclose(both, base).all(dim=2) | torch.isclose(both, -base).all(dim=2)).all()


def test_strong_noise_is_level_times_the_segment_std():
    x = _batch(n=64, length=2000) * 3.0
    for level in (0.05, 0.15):
        out = Augmenter(1, 'cpu', (f'noise={level}',))(x)
        ratio = ((out - x).std(dim=2) / x.std(dim=2)).mean().item()
        assert ratio == pytest.approx(level, rel=0.05)


@pytest.mark.parametrize('value', [('flop',), (), ('noise', 'noise=0.15'), ('noise=0',),
                                   ('noise=2',), ('noise=abc',), 'flip', (1,), None, 1,
                                   ('noise=nan',)])
def test_bad_augment_values_are_refused_naming_the_setting_the_rule_and_the_value(
        make_settings, value):
    assert augment_levels(value) is None
    with pytest.raises(SettingsError) as err:
        make_settings(AUGMENT=value)
    text = str(err.value)
    assert 'AUGMENT must be True, False, or a non-empty list/tuple of distinct names' in text
    assert f"got AUGMENT={value!r}" in text and "'flip'" in text
    with pytest.raises(ValueError, match='AUGMENT must be'):
        Augmenter(0, 'cpu', value)


def test_augment_names_are_valid_settings_and_keys(make_settings):
    base = make_settings()
    named = make_settings(AUGMENT=['scale', 'noise=0.15', 'flip'])
    assert named.AUGMENT == ('scale', 'noise=0.15', 'flip')
    assert settings_key(named) != settings_key(base)
    assert settings_key(make_settings(AUGMENT=True)) == settings_key(base)
    assert augment_levels(('flip', ' noise = 0.15 ')) == {'noise': 0.15, 'flip': None}


# ----------------------------------------------------------------------------- threshold

def test_pick_threshold_finds_the_best_threshold_of_a_constructed_example():
    # positives at 0.30..0.39 and 0.8, negatives at 0.05..0.25: at 0.5 the positives below
    # are missed; any t in (0.25, 0.30) separates the classes perfectly
    p_pos = np.r_[np.linspace(0.30, 0.39, 10), 0.8]
    p_neg = np.linspace(0.05, 0.25, 12)
    p1 = np.r_[p_pos, p_neg]
    y = np.r_[np.ones(11), np.zeros(12)].astype(int)
    t = pick_threshold(np.c_[1 - p1, p1], y, 'min4')
    assert 0.25 < t < 0.30
    assert binary_metrics(y, (p1 > t).astype(int)) == {'f1': 1.0, 'accuracy': 1.0,
                                                       'precision': 1.0, 'recall': 1.0}
    assert pick_threshold(p1, y, 'auc') == t               # auc: chosen by min4
    assert pick_threshold(p1, y, 'f1') == t
    # the vectorised scores are binary_metrics' figures at each candidate
    cands, scores = threshold_scores(p1, y, 'min4')
    for c, s in zip(cands, scores):
        m = binary_metrics(y, (p1 > c).astype(int))
        assert s == pytest.approx(min(m.values()))


def test_ties_go_to_the_candidate_nearest_one_half_and_nothing_beats_one_half():
    p1 = np.array([0.1, 0.2, 0.7, 0.9])
    y = np.array([0, 0, 1, 1])
    assert pick_threshold(p1, y, 'min4') == 0.5            # every t in (0.2, 0.7) is perfect
    assert 0.5 in candidate_thresholds(p1)
    assert pick_threshold(np.array([0.6]), np.array([1]), 'min4') == 0.5
    assert pick_threshold(np.zeros(0), np.zeros(0, int), 'min4') == 0.5


def test_subject_metrics_choose_a_threshold_too():
    from public.train.metrics import Scoring
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p1 = np.clip(0.25 + 0.3 * y + 0.15 * rng.standard_normal(200), 0.01, 0.99)
    subjects = np.repeat(np.arange(10), 20).astype(str)
    for metric in ('subj_fbeta', 'gen', 'contest', 'fbeta'):
        t = pick_threshold(p1, y, metric, subjects, Scoring())
        cands, scores = threshold_scores(p1, y, metric, subjects, Scoring())
        assert scores[list(cands).index(t)] == scores.max()
        assert scores.max() >= scores[list(cands).index(0.5)]


class _Head(nn.Module):
    def __init__(self, c=3):
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(c, 6, 5), nn.BatchNorm1d(6), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(6, 8), nn.SiLU(), nn.Linear(8, 2))

    def forward(self, x):
        return self.head(self.body(x.squeeze(-1)).mean(dim=2))


@pytest.mark.parametrize('where', [0.03, 0.37, 0.5, 0.9, 'half', 'high'])
def test_folding_makes_the_argmax_the_thresholded_decision(where):
    torch.manual_seed(1)
    model = _Head().eval()
    x = 3 * torch.randn(500, 3, 40, 1)
    with torch.no_grad():
        p1 = torch.softmax(model(x).double(), dim=1)[:, 1]
        s = p1.sort().values
        k = int(where * len(s)) if isinstance(where, float) else 0
        t = {'half': 0.5, 'high': 0.999}.get(where, float((s[k] + s[k + 1]) / 2))
        fold_threshold(model.train(), t, x[:16])
        assert model.training, 'the mode is restored'
        pred = model.eval()(x).argmax(dim=1)
    assert torch.equal(pred, (p1 > t).long())
    if isinstance(where, float):
        assert int((p1 > t).sum()) == len(x) - k - 1
    assert set(model.state_dict()) == set(_Head().state_dict())


def test_fold_without_an_example_uses_the_last_two_output_linear():
    torch.manual_seed(2)
    model = TinyNet(input_size=64).eval()
    x = torch.randn(200, 1, 64, 1)
    with torch.no_grad():
        margin = (model(x)[:, 1] - model(x)[:, 0]).double()
        fold_threshold(model, 0.3)
        assert torch.equal(model(x).argmax(1), (margin > threshold_logit(0.3)).long())


def test_a_model_the_bias_cannot_decide_is_refused_unchanged():
    class Scaled(_Head):                 # logits = 2 x the head: the fold check fails
        def forward(self, x):
            return 2 * super().forward(x)

    class NoBias(_Head):
        def __init__(self):
            super().__init__()
            self.head[-1] = nn.Linear(8, 2, bias=False)

    torch.manual_seed(3)
    x = torch.randn(8, 3, 40, 1)
    for model in (Scaled().eval(), NoBias().eval()):
        before = copy.deepcopy(model.state_dict())
        with pytest.raises(ValueError, match='CALIBRATE_THRESHOLD: cannot fold'):
            fold_threshold(model, 0.3, x)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match=r'in \(0, 1\)'):
        threshold_logit(1.0)


def test_calibrate_threshold_is_refused_for_multi_class_and_multi_label(make_settings):
    with pytest.raises(SettingsError, match=r"CALIBRATE_THRESHOLD=True .* needs a binary task"):
        make_settings(CALIBRATE_THRESHOLD=True, CLASSES=('A', 'B', 'C'))
    with pytest.raises(SettingsError, match='CALIBRATE_THRESHOLD'):
        make_settings(CALIBRATE_THRESHOLD=True, LABEL_MODE='multilabel', CLASSES=('A', 'B'))
    assert make_settings(CALIBRATE_THRESHOLD=True).CALIBRATE_THRESHOLD is True


def _segments(folder):
    files = sorted(folder.glob('*.txt'))
    return files, np.stack([np.loadtxt(f, dtype=np.float32)[None, :] for f in files])


def test_run_trial_exports_the_calibrated_decision_and_predict_agrees(
        make_settings, prepared, small_data, tmp_path):
    settings = make_settings(CALIBRATE_THRESHOLD=True, SELECT_METRIC='fbeta', NUM_EPOCHS=2)
    plain = make_settings(SELECT_METRIC='fbeta', NUM_EPOCHS=2)
    path = str(tmp_path / 'cal.onnx')
    result = run_trial(lambda: TinyNet(), 0.003, prepared, settings, path, progress=False,
                       latency=False)
    base = run_trial(lambda: TinyNet(), 0.003, prepared, plain, str(tmp_path / 'p.onnx'),
                     progress=False, latency=False)
    assert result.status == TrialStatus.OK, result.error
    assert base.threshold == 0.5
    t = result.threshold
    assert t != 0.5, 'the example should move the threshold'
    # the calibrated model is the plain one (same seed, same training) with its bias moved
    unfolded = copy.deepcopy(result.model).eval()
    with torch.no_grad():
        unfolded.fc.bias[1] += threshold_logit(t)
    assert all(torch.allclose(v, base.state_dict[k], atol=1e-6)
               for k, v in unfolded.state_dict().items())
    assert torch.equal(result.state_dict['fc.bias'], result.model.fc.bias.detach())
    # validation: the recorded score is the best the threshold search found, >= plain's
    y_val = prepared.trial.y_val.numpy()
    with torch.no_grad():
        p_val = torch.softmax(unfolded(prepared.trial.x_val.unsqueeze(-1)).double(), 1)
    cands, scores = threshold_scores(p_val.numpy(), y_val, 'fbeta')
    assert selection_score(result.val_metrics, 'fbeta') == pytest.approx(scores.max())
    assert scores.max() >= selection_score(base.val_metrics, 'fbeta') - 1e-12
    # the ONNX file's argmax is the calibrated torch decision, on a test folder
    files, x = _segments(small_data.test)
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    onnx_labels = session.run(None, {session.get_inputs()[0].name: x[..., None]})[0].argmax(1)
    with torch.no_grad():
        p1 = torch.softmax(unfolded(torch.from_numpy(x[..., None])).double(), 1)[:, 1]
    assert onnx_labels.tolist() == (p1 > t).long().tolist()
    # ... and predict.py's labels on that folder agree
    out = tmp_path / 'predictions.csv'
    assert predict.main([path, str(small_data.test), '--out', str(out)]) == 0
    table = pd.read_csv(out)
    by_file = dict(zip((f.stem for f in files), onnx_labels.tolist()))
    ids = [str(i) for i in table['id']]
    assert len(ids) == len(files)
    assert [by_file[i.rsplit('/', 1)[-1].removesuffix('.txt')] for i in ids] \
        == table['label'].tolist()
    assert math.isfinite(t) and 0 < t < 1
    # the result folder records the threshold (result.json and one added line)
    from public.results.files import read_info, write_result_files
    for s, r, name in ((settings, result, 'cal'), (plain, base, 'plain')):
        folder = tmp_path / name
        folder.mkdir()
        write_result_files(str(folder), result=r, name=name, model_name='TinyNet', lr=0.003,
                           settings=s, onnx_bytes=r.onnx_bytes)
        text = (folder / 'evaluation_metrics.txt').read_text()
        if s is settings:
            assert read_info(str(folder))['decision_threshold'] == t
            assert f"Decision threshold: class 1 when P(class 1) > {t:.6g}" in text
        else:
            assert 'decision_threshold' not in read_info(str(folder))
            assert 'Decision threshold' not in text
