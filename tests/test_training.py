"""Tests of public/train/loop.py: the early-stopping rule and the training loop."""
import math

import numpy as np
import pytest
import torch

from conftest import PARAMS, TinyNet
from public.model import OptimizedAFNet
from public.core.settings import load_settings
from public.data.prepare import TrialData
from public.train.loop import EarlyStopping, STOP_DIVERGED, STOP_EARLY, STOP_MAX_EPOCHS, train_model

NAN, INF = float('nan'), float('inf')

# (patience, gap, train losses, val losses) -> (stop epoch or None, reason)
EARLY_STOPPING = [
    # val keeps improving: never stops
    (2, 0.01, [0.9, 0.8, 0.7, 0.6], [0.9, 0.8, 0.7, 0.6], (None, None)),
    # val stalls for `patience` epochs while train < val - gap: the original's overfitting stop
    (2, 0.01, [0.9, 0.8, 0.5, 0.4], [1.0, 0.9, 0.95, 0.96], (4, STOP_EARLY)),
    # one epoch short of patience: goes on
    (3, 0.01, [0.9, 0.8, 0.5, 0.4], [1.0, 0.9, 0.95, 0.96], (None, None)),
    (3, 0.01, [0.9, 0.8, 0.5, 0.4, 0.3], [1.0, 0.9, 0.95, 0.96, 0.97], (5, STOP_EARLY)),
    # val stalls but the model is not overfitting (train >= val - gap): no stop
    (2, 0.01, [0.9, 0.95, 0.95, 0.99], [1.0, 0.9, 0.95, 0.96], (None, None)),
    # gap boundary, binary-exact values: train == val - gap is not overfitting, just below is
    (1, 0.25, [1.0, 0.25], [0.5, 0.5], (None, None)),
    (1, 0.25, [1.0, 0.2499], [0.5, 0.5], (2, STOP_EARLY)),
    # equal val loss is not an improvement
    (1, 0.0, [1.0, 0.1], [0.5, 0.5], (2, STOP_EARLY)),
    # an improvement resets the count
    (2, 0.01, [0.5, 0.4, 0.3, 0.2, 0.1, 0.1], [1.0, 1.1, 0.9, 1.0, 1.1, 1.2], (5, STOP_EARLY)),
    # non-finite losses: diverged, at once
    (5, 0.01, [0.9, NAN], [0.9, 0.8], (2, STOP_DIVERGED)),
    (5, 0.01, [0.9, 0.8], [0.9, INF], (2, STOP_DIVERGED)),
    (5, 0.01, [NAN], [NAN], (1, STOP_DIVERGED)),
]


@pytest.mark.parametrize('patience,gap,train,val,expected', EARLY_STOPPING)
def test_early_stopping_rule(patience, gap, train, val, expected):
    stopper = EarlyStopping(patience, gap)
    outcome = (None, None)
    for epoch, (t, v) in enumerate(zip(train, val), start=1):
        improved, stop, reason = stopper.step(epoch, t, v)
        if stop:
            outcome = (epoch, reason)
            break
        assert reason is None
    assert outcome == expected


def test_early_stopping_tracks_the_best_epoch():
    stopper = EarlyStopping(patience=10, overfit_gap=0.0)
    flags = [stopper.step(e, 0.5, v)[0] for e, v in enumerate([0.9, 0.7, 0.8, 0.6, 0.6], 1)]
    assert flags == [True, True, False, True, False]
    assert (stopper.best_epoch, stopper.best_val_loss) == (4, 0.6)


# ----------------------------------------------------------------------------- training loop

def _noise_data(n_train=64, n_val=64, length=64, seed=0):
    """Random segments with random labels: a net can only memorise them, so it overfits."""
    g = np.random.default_rng(seed)
    return TrialData(torch.from_numpy(g.standard_normal((n_train, 1, length)).astype(np.float32)),
                     torch.from_numpy(g.integers(0, 2, n_train)),
                     torch.from_numpy(g.standard_normal((n_val, 1, length)).astype(np.float32)),
                     torch.from_numpy(g.integers(0, 2, n_val)))


def _settings(**kw):
    """Validated settings (params.py plus these overrides; no augmentation)."""
    base = dict(WEIGHT_DECAY=1e-3, PATIENCE=100, OVERFIT_GAP=0.01, SEED=0, NUM_EPOCHS=12,
                BATCH_SIZE=16, AUGMENT=False, CLASS_WEIGHTS='none')
    return load_settings([f"{k}={v!r}" for k, v in {**base, **kw}.items()],
                         params_path=str(PARAMS))


def _val_loss(model, data):
    model.eval()
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(data.x_val.unsqueeze(-1)), data.y_val).item()


@pytest.fixture(scope='module')
def overfit_run():
    data = _noise_data()
    torch.manual_seed(0)
    model = OptimizedAFNet(input_size=64)
    outcome = train_model(model, data, 0.01, _settings(), torch.device('cpu'), progress=False)
    return model, data, outcome


def test_training_keeps_the_best_validation_weights(overfit_run):
    model, data, outcome = overfit_run
    val = [h[2] for h in outcome.history]
    assert outcome.epochs == len(outcome.history) == 12
    assert outcome.stop_reason == STOP_MAX_EPOCHS
    assert outcome.best_epoch == int(np.argmin(val)) + 1
    assert outcome.best_epoch < outcome.epochs, 'the noise data must overfit for this test'
    assert _val_loss(model, data) == pytest.approx(min(val), rel=1e-5)
    assert _val_loss(model, data) < val[-1] - 1e-3
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, outcome.state_dict[name])


def test_learning_rate_halves_on_a_validation_plateau(overfit_run):
    lrs = [h[3] for h in overfit_run[2].history]
    assert lrs[0] == 0.01
    assert all(b in (a, a / 2) for a, b in zip(lrs, lrs[1:]))
    first_cut = next(i for i, (a, b) in enumerate(zip(lrs, lrs[1:]), start=2) if b < a)
    assert first_cut - overfit_run[2].best_epoch >= 4     # patience 3: the 4th bad epoch cuts


def test_training_stops_early_when_overfitting():
    torch.manual_seed(0)
    outcome = train_model(OptimizedAFNet(input_size=64), _noise_data(), 0.01,
                          _settings(PATIENCE=2, NUM_EPOCHS=30), torch.device('cpu'), progress=False)
    assert outcome.stop_reason == STOP_EARLY
    assert outcome.epochs == outcome.best_epoch + 2 < 30
    train, val = outcome.history[-1][1:3]
    assert train < val - 0.01


def test_nan_loss_is_reported_as_diverged():
    data = _noise_data(n_train=8, n_val=4)
    data.x_train[0, 0, 5] = float('nan')
    outcome = train_model(OptimizedAFNet(input_size=64), data, 0.01, _settings(NUM_EPOCHS=5),
                          torch.device('cpu'), progress=False)
    assert (outcome.stop_reason, outcome.epochs) == (STOP_DIVERGED, 1)
    assert math.isnan(outcome.history[0][1])


@pytest.mark.parametrize('n_train', [33, 17, 49])
def test_a_last_batch_of_one_sample_does_not_break_batchnorm(n_train):
    outcome = train_model(TinyNet(input_size=64), _noise_data(n_train=n_train, n_val=8), 0.01,
                          _settings(NUM_EPOCHS=2, BATCH_SIZE=16), torch.device('cpu'),
                          progress=False)
    assert outcome.epochs == 2


