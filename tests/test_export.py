"""Tests of public/compress/export.py: one self-contained ONNX file of known size, checked and timed.

The registry-wide export test is in test_models.py; these are the export module's own rules.
"""
import os

import numpy as np
import onnx
import pytest
import torch

from public.compress.export import (ExportError, check_onnx, export_onnx, onnx_latency_ms,
                                    onnx_predict, size_kb)
from public.model import OptimizedAFNet


@pytest.mark.parametrize('size_bytes,kb', [(0, 0), (1, 1), (1023, 1), (1024, 1), (1025, 2),
                                           (2048, 2), (61440, 60), (61441, 61)])
def test_size_kb_rounds_up_in_kib(size_bytes, kb):
    assert size_kb(size_bytes) == kb


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = OptimizedAFNet(input_size=1250)
    with torch.no_grad():
        m.train()(torch.randn(8, 1, 1250, 1))
    return m


def _x(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 1, 1250)).astype(np.float32)


@pytest.mark.parametrize('opset', [18, 20, 23])
def test_export_writes_requested_opset_and_returns_exact_size(model, tmp_path, opset):
    path = tmp_path / 'saved.onnx'
    size = export_onnx(model, str(path), in_channels=1, input_size=1250, opset=opset)
    assert size == os.path.getsize(path)
    assert os.listdir(tmp_path) == ['saved.onnx']
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert {o.domain: o.version for o in proto.opset_import}[''] == opset
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


def test_export_leaves_the_model_as_it_was(model, tmp_path):
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, str(tmp_path / 'm.onnx'), 1, 1250, 18)
    assert model.training
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_export_overwrites_an_existing_file(model, tmp_path):
    path = tmp_path / 'm.onnx'
    path.write_bytes(b'old junk')
    size = export_onnx(model, str(path), 1, 1250, 18)
    assert size == os.path.getsize(path) > 100
    onnx.checker.check_model(onnx.load(str(path)))


def test_onnx_predictions_match_pytorch_in_batches(model, tmp_path):
    path = tmp_path / 'm.onnx'
    export_onnx(model, str(path), 1, 1250, 18)
    x = _x(37)
    got = onnx_predict(str(path), x, batch_size=10)
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(x).unsqueeze(-1)).numpy()
    assert got.shape == (37, 2)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)
    assert check_onnx(str(path), model, x) < 1e-4


def test_check_onnx_fails_when_the_file_is_not_this_model(model, tmp_path):
    path = tmp_path / 'm.onnx'
    export_onnx(model, str(path), 1, 1250, 18)
    torch.manual_seed(123)
    other = OptimizedAFNet(input_size=1250)
    with pytest.raises(ExportError, match=r'm\.onnx: onnxruntime output differs from PyTorch'):
        check_onnx(str(path), other, _x(4))


def test_latency_is_a_positive_median_in_ms(model, tmp_path):
    path = tmp_path / 'm.onnx'
    export_onnx(model, str(path), 1, 1250, 18)
    latency = onnx_latency_ms(str(path), runs=5, warmup=1)
    assert 0 < latency < 1000
