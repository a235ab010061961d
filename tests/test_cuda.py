"""The CUDA path (skipped without a GPU): a trial on the GPU, the Ray worker's data path
(tensors arrive on the CPU from the object store and move to the GPU once), and both
stages end to end with DEVICE='cuda'."""
import os

import numpy as np
import pytest
import torch

from conftest import TinyNet, output, run_script, settings_values, write_params
from public.search.executor import from_shareable, to_shareable
from public.data.prepare import on_device, prepare_data
from public.search.trial import TrialSpec, run_trial, run_trial_job
from public.train.outcome import TrialStatus

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')


@pytest.fixture(scope='module')
def on_gpu(small_data, tmp_path_factory):
    from conftest import PARAMS
    from public.core.settings import load_settings
    values = settings_values(tmp_path_factory.mktemp('cuda'), small_data, DEVICE='cuda')
    settings = load_settings([f"{k}={v!r}" for k, v in values.items()], params_path=str(PARAMS))
    return settings, prepare_data(settings, progress=False)


def test_a_trial_trains_on_the_gpu_and_exports_a_matching_onnx(on_gpu, tmp_path):
    settings, data = on_gpu
    assert data.trial.x_train.is_cuda
    result = run_trial(lambda: TinyNet(), 0.003, data, settings, str(tmp_path / 't.onnx'),
                       progress=False)
    assert result.status == TrialStatus.OK, result.error
    assert all(not v.is_cuda for v in result.state_dict.values())
    assert result.onnx and result.val_metrics


def test_the_worker_path_moves_cpu_data_to_the_gpu(on_gpu):
    settings, data = on_gpu
    shared = from_shareable(to_shareable(data))        # what a Ray worker receives
    assert not shared.trial.x_train.is_cuda and shared.device.type == 'cuda'
    moved = on_device(shared)
    assert moved.trial.x_train.is_cuda and on_device(shared) is moved   # moved once, cached
    assert torch.equal(moved.trial.x_train.cpu(), data.trial.x_train.cpu())
    spec = TrialSpec(key='TinyNet@0.003', build=TinyNet, lr=0.003, settings=settings)
    worker = run_trial_job(spec, shared)
    local = run_trial_job(spec, data)
    assert worker.status == local.status == TrialStatus.OK, worker.error
    # cuDNN's backward is not bitwise deterministic: the same metrics, not the same bits
    assert worker.val_metrics == pytest.approx(local.val_metrics, abs=0.02)


def test_both_stages_end_to_end_on_the_gpu(small_data, tmp_path):
    values = settings_values(tmp_path, small_data, DEVICE='cuda', NUM_EPOCHS=2,
                             CHANNEL_SCALES=(1, 2), FC_SCALES=(1,), METRIC_TARGET=1,
                             SIZE_TARGET_KB=100)
    write_params(tmp_path, **values)
    first = run_script('train_multi.py', tmp_path)
    assert first.returncode == 0, output(first)[-3000:]
    assert 'device: cuda' in first.stdout
    second = run_script('train_final.py', tmp_path)
    assert second.returncode == 0, output(second)[-3000:]
    assert 'meets both targets' in second.stdout
    assert np.isfinite(float(open(os.path.join(tmp_path, 'multi-result', 'summary.csv')).read()
                             .splitlines()[1].split(',')[6]))
