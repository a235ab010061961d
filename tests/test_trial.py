"""Tests of public/search/trial.py: data preparation and one trial (build, train, evaluate, export)."""
import re
import shutil

import numpy as np
import pytest
import torch

from conftest import TinyNet, write_segment
from public.model import OptimizedAFNet
from public.train.loop import STOP_DIVERGED
from public.data.prepare import choose_device, prepare_data
from public.search.trial import run_trial
from public.train.outcome import TrialStatus


def test_prepared_data_is_split_by_subject_and_ready(prepared, small_data):
    t = prepared.trial
    assert t.x_train.shape[1:] == t.x_val.shape[1:] == (1, 1250)
    assert len(t.x_train) + len(t.x_val) == 96
    assert set(t.y_train.tolist()) == set(t.y_val.tolist()) == {0, 1}
    assert prepared.x_test.shape == (16, 1, 1250) and list(np.unique(prepared.y_test)) == [0, 1]
    assert prepared.onnx_sample.shape == (min(32, len(t.x_val)), 1, 1250)
    assert (prepared.in_channels, prepared.input_size, prepared.num_classes) == (1, 1250, 2)
    assert '96 segments' in prepared.summary and '6 subjects train / 2 validate' in prepared.summary


def test_bad_files_are_skipped_and_reported_when_asked(make_settings, small_data, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(small_data.train, data)
    write_segment(data / 'S999-N-0.txt', text='0.1\n' * 1249)
    settings = make_settings(DATA_DIR=str(data), CACHE_DIR=str(tmp_path / 'cache'),
                             SKIP_BAD_FILES=True)
    prepared = prepare_data(settings, progress=False)
    assert len(prepared.trial.x_train) + len(prepared.trial.x_val) == 96
    assert re.search(r'skipped 1 bad file\(s\) in .*S999-N-0\.txt: has 1249 samples', prepared.summary)
    again = prepare_data(settings, progress=False)
    assert 'from cache' in again.summary and 'skipped 1 bad file(s)' in again.summary


def test_device_choice():
    assert choose_device('cpu') == torch.device('cpu')
    assert choose_device('auto').type == ('cuda' if torch.cuda.is_available() else 'cpu')


# ----------------------------------------------------------------------------- trials

def test_trial_is_seeded_and_starts_from_a_fresh_model(prepared, make_settings, tmp_path):
    settings = make_settings(NUM_EPOCHS=2)
    a = run_trial(lambda: OptimizedAFNet(input_size=1250), 0.003, prepared, settings,
                  str(tmp_path / 'a.onnx'), progress=False, latency=False)
    b = run_trial(lambda: OptimizedAFNet(input_size=1250), 0.003, prepared, settings,
                  str(tmp_path / 'b.onnx'), progress=False, latency=False)
    assert a.status == b.status == TrialStatus.OK, a.error
    assert a.val_metrics == b.val_metrics and a.test_metrics == b.test_metrics
    for name in a.state_dict:
        torch.testing.assert_close(a.state_dict[name], b.state_dict[name], rtol=0, atol=0)
    assert a.epochs == 2 and a.params == sum(p.numel() for p in OptimizedAFNet().parameters())
    assert a.onnx_bytes == (tmp_path / 'a.onnx').stat().st_size
    assert {'f1', 'accuracy', 'precision', 'recall'} <= set(a.val_metrics) == set(a.test_metrics)


class _BreaksOnInit(torch.nn.Module):
    def __init__(self, **kw):
        raise RuntimeError('cannot build this one')


class _WrongOutput(TinyNet):
    def forward(self, x):
        return super().forward(x)[:, :1]


@pytest.mark.parametrize('cls,message', [
    (_BreaksOnInit, 'RuntimeError: cannot build this one'),
    (_WrongOutput, r'ValueError: model output has shape \(2, 1\) for input \(2, 1, 1250, 1\); '
                   r'expected \(2, 2\)'),
])
def test_a_model_that_fails_is_a_failed_trial_not_an_exception(prepared, make_settings, tmp_path,
                                                               cls, message):
    result = run_trial(lambda: cls(input_size=1250), 0.003, prepared, make_settings(),
                       str(tmp_path / 'x.onnx'), progress=False)
    assert result.status == TrialStatus.FAILED and result.epochs == 0
    assert re.match(message, result.error)
    assert 'Traceback' in result.error


def test_a_diverging_trial_is_recorded_as_diverged(prepared, make_settings, tmp_path):
    class NanNet(TinyNet):
        def forward(self, x):
            return super().forward(x) * float('nan')
    result = run_trial(lambda: NanNet(), 0.003, prepared, make_settings(NUM_EPOCHS=3),
                       str(tmp_path / 'x.onnx'), progress=False)
    assert result.status == TrialStatus.DIVERGED and result.stop_reason == STOP_DIVERGED
    assert result.epochs == 1
    assert not (tmp_path / 'x.onnx').exists()
