"""Tests of public/quantize.py: the INT8 ONNX model is a real, self-contained, measured file."""
import os
import shutil

import numpy as np
import onnx
import pytest
import torch

from public import ss_model
from public.dataset import load_folder
from public.export import export_onnx, onnx_predict
from public.model import OptimizedAFNet
from public.quantize import quantize_int8


@pytest.fixture(scope='module')
def segments(small_data):
    return load_folder(str(small_data.train), 1250, progress=False).x


@pytest.mark.parametrize('build', [lambda: ss_model.AFNet(ss_model.generate_config(1, 1, 1250)),
                                   lambda: OptimizedAFNet(input_size=1250)],
                         ids=['ss_model-c1-f1', 'OptimizedAFNet'])
def test_int8_model_is_smaller_self_contained_and_close_to_float(build, segments, tmp_path):
    torch.manual_seed(0)
    model = build()
    with torch.no_grad():
        model.train()(torch.from_numpy(np.array(segments[:64])).unsqueeze(-1))
    float_path, int8_path = tmp_path / 'm.onnx', tmp_path / 'out' / 'm.int8.onnx'
    int8_path.parent.mkdir()
    float_bytes = export_onnx(model, str(float_path), 1, 1250, 18)
    size = quantize_int8(str(float_path), str(int8_path), segments[:64])
    assert size == os.path.getsize(int8_path) < float_bytes
    assert os.listdir(int8_path.parent) == ['m.int8.onnx'], 'no side files'
    proto = onnx.load(str(int8_path))
    ops = {n.op_type for n in proto.graph.node}
    assert {'QuantizeLinear', 'DequantizeLinear'} <= ops
    alone = tmp_path / 'alone'
    alone.mkdir()
    shutil.copy(int8_path, alone / 'm.int8.onnx')
    x = np.array(segments)
    expected, got = onnx_predict(str(float_path), x), onnx_predict(str(alone / 'm.int8.onnx'), x)
    assert got.shape == expected.shape == (len(x), 2)
    assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max() + 0.01
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.9
