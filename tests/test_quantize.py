"""Tests of public/compress/quantize.py: the INT8 ONNX model is a real, self-contained, measured file."""
import os
import shutil

import numpy as np
import onnx
import pytest
import torch

from public import ss_model
from public.dataset import load_folder
from public.compress.export import export_onnx, onnx_predict
from public.model import OptimizedAFNet
from public.compress.quantize import quantize_int8


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


def _int8_weights(path):
    from onnx import numpy_helper
    return [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer
            if t.data_type == onnx.TensorProto.INT8]


def test_reduce_range_keeps_weights_in_7_bits_so_every_cpu_computes_the_file(segments, tmp_path):
    """reduce_range: int8 weights in [-64, 64], so no uint8 x int8 pair sum exceeds int16
    (2 x 255 x 64 = 32,640) and onnxruntime's fused kernels equal the QDQ graph run node by
    node (exact arithmetic) on any CPU; full range reaches +-127."""
    import onnxruntime as ort
    torch.manual_seed(0)
    model = ss_model.AFNet(ss_model.generate_config(2, 1, 1250))
    with torch.no_grad():
        model.train()(torch.from_numpy(np.array(segments[:64])).unsqueeze(-1))
    float_path = tmp_path / 'm.onnx'
    export_onnx(model, str(float_path), 1, 1250, 18)
    x = np.array(segments)
    for reduce_range, limit in ((True, 64), (False, 127)):
        path = tmp_path / f'm-{reduce_range}.int8.onnx'
        quantize_int8(str(float_path), str(path), segments[:64], reduce_range=reduce_range)
        assert max(int(np.abs(w.astype(np.int32)).max()) for w in _int8_weights(path)) == limit
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(tmp_path / 'm-True.int8.onnx'), options,
                                   providers=['CPUExecutionProvider'])
    unfused = session.run(None, {session.get_inputs()[0].name: x[..., None]})[0]
    np.testing.assert_allclose(onnx_predict(str(tmp_path / 'm-True.int8.onnx'), x), unfused,
                               atol=1e-4)
