"""public/compress/graph_stats.py: deployment figures of ONNX files, checked against hand counts.

Two graphs built with onnx.helper (every figure counted by hand in the comments), a real
torch export of a tiny Conv1d model, and its INT8 QDQ file from onnxruntime's quantize_static.
"""
import contextlib
import io
import logging
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from public.compress.graph_stats import format_stats, graph_stats

FLOAT = TensorProto.FLOAT


def _init(name, array, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(array, dtype=dtype), name)


def _model(nodes, inputs, outputs, initializers, extra_domains=()):
    graph = helper.make_graph(nodes, 'g', inputs, outputs, initializers)
    opsets = [helper.make_opsetid('', 18)] + [helper.make_opsetid(d, 1) for d in extra_domains]
    return helper.make_model(graph, opset_imports=opsets, ir_version=9)


# ----------------------------------------------------------------------------- graph 1
# X (N, 1, 1250, 1) -> Conv 1->4, kernel (9, 1), stride (4, 1) -> C (1, 4, 311, 1)
#   [(1250 - 9) // 4 + 1 = 311] -> Relu -> R -> GlobalAveragePool -> G (1, 4, 1, 1)
#   -> Flatten -> F (1, 4) -> Gemm 4->2 (transB) -> Y (1, 2)
# MACs: Conv 4*311 outputs x (Cin 1 x kernel 9) = 11196; Gemm 1x4x2 = 8 -> 11204.
# params: W 4*1*9*1 = 36, B 4, W2 2*4 = 8, B2 2 -> 50; float32: 200 bytes.
# liveness (elements; step = node index): X [start, 0] 1250, C [0, 1] 1244, R [1, 2] 1244,
#   G [2, 3] 4, F [3, 4] 4, Y [4, end] 2.
#   step 0 (Conv): X + C = 2494; step 1 (Relu): C + R = 2488; step 2: R + G = 1248; ...
#   peak 2494 elements = 9976 bytes (float32); INT8 (1 byte each) 2494.
#   (A sum of all tensors would be 3748 elements, the largest single one 1250.)
GRAPH1 = dict(macs=11204, params=50, param_bytes=200, peak_activation_bytes=9976,
              peak_activation_bytes_int8=2494)


def graph1(activation=('Relu', ''), qdq=False, input_dims=('N', 1, 1250, 1)):
    """Graph 1; activation (op, domain); qdq: Q/DQ around the Conv and an int8 weight."""
    act, domain = activation
    rng = np.random.default_rng(0)
    inits = [_init('B', rng.normal(size=4)), _init('W2', rng.normal(size=(2, 4))),
             _init('B2', rng.normal(size=2))]
    nodes = []
    conv_x, conv_w, gap_x = 'X', 'W', 'R'
    if qdq:
        inits += [_init('Wq', rng.integers(-64, 64, (4, 1, 9, 1)), np.int8),
                  _init('ws', [0.01] * 4), _init('wz', [0] * 4, np.int8),
                  _init('xs', 0.02), _init('xz', 128, np.uint8),
                  _init('rs', 0.03), _init('rz', 0, np.uint8)]
        nodes += [helper.make_node('DequantizeLinear', ['Wq', 'ws', 'wz'], ['Wf'], axis=0),
                  helper.make_node('QuantizeLinear', ['X', 'xs', 'xz'], ['xq']),
                  helper.make_node('DequantizeLinear', ['xq', 'xs', 'xz'], ['xd'])]
        conv_x, conv_w, gap_x = 'xd', 'Wf', 'rd'
    else:
        inits.append(_init('W', rng.normal(size=(4, 1, 9, 1))))
    nodes.append(helper.make_node('Conv', [conv_x, conv_w, 'B'], ['C'], kernel_shape=[9, 1],
                                  strides=[4, 1]))
    nodes.append(helper.make_node(act, ['C'], ['R'], domain=domain))
    if qdq:
        nodes += [helper.make_node('QuantizeLinear', ['R', 'rs', 'rz'], ['rq']),
                  helper.make_node('DequantizeLinear', ['rq', 'rs', 'rz'], ['rd'])]
    nodes += [helper.make_node('GlobalAveragePool', [gap_x], ['G']),
              helper.make_node('Flatten', ['G'], ['F']),
              helper.make_node('Gemm', ['F', 'W2', 'B2'], ['Y'], transB=1)]
    return _model(nodes, [helper.make_tensor_value_info('X', FLOAT, list(input_dims))],
                  [helper.make_tensor_value_info('Y', FLOAT, ['N', 2])], inits,
                  extra_domains=[domain] if domain else ())


def test_graph1_conv_relu_pool_gemm_hand_counts():
    stats = graph_stats(graph1())
    assert stats == GRAPH1
    assert format_stats(stats) == ('11.2 k MACs, 0.20 KB params, peak activations 9.74 KB '
                                   '(INT8 2.44 KB)')


def test_unknown_shapes_fall_back_to_an_onnxruntime_run():
    # onnx shape inference does not know onnxruntime's com.microsoft.Gelu: every shape after
    # it is unknown, and the one onnxruntime run must give the same figures as with Relu.
    model = graph1(activation=('Gelu', 'com.microsoft'))
    fixed = onnx.shape_inference.infer_shapes(model, data_prop=True)
    known = {v.name for v in fixed.graph.value_info if v.type.tensor_type.HasField('shape')}
    assert 'C' in known and not {'R', 'G', 'F'} & known
    assert graph_stats(model) == GRAPH1


def test_symbolic_length_needs_input_shape():
    model = graph1(input_dims=('N', 1, 'L', 1))
    with pytest.raises(ValueError, match="input_shape"):
        graph_stats(model)
    assert graph_stats(model, input_shape=(1, 1, 1250, 1)) == GRAPH1
    # Twice the length: Conv outputs (2500 - 9) // 4 + 1 = 623 per channel.
    assert graph_stats(model, input_shape=(1, 1, 2500, 1))['macs'] == 4 * 623 * 9 + 8


def test_graph1_qdq_hand_counts():
    # Node order: 0 DQ(Wq)->Wf, 1 Q(X)->xq, 2 DQ(xq)->xd, 3 Conv->C, 4 Relu->R, 5 Q(R)->rq,
    # 6 DQ(rq)->rd, 7 GAP->G, 8 Flatten->F, 9 Gemm->Y.
    # MACs: the float Conv between DQ and Q, as graph 1: 11204.
    # params: Wq 36 (int8) + B 4 + W2 8 + B2 2 = 50 (scales / zero points are no params).
    # param_bytes: Wq 36 + ws 16 + wz 4 + B 16 + xs 4 + xz 1 + rs 4 + rz 1 + W2 32 + B2 8 = 122.
    # Wf is computed from constants only: not an activation.
    # bytes: X [0, 1] 5000, xq [1, 2] 1250, xd [2, 3] 5000, C [3, 4] 4976, R [4, 5] 4976,
    #   rq [5, 6] 1244, rd [6, 7] 4976, G [7, 8] 16, F [8, 9] 16, Y [9] 8.
    #   step 1: 6250, 2: 6250, 3 (Conv): xd + C = 9976, 4: 9952, 5: 6220 -> peak 9976.
    # INT8: {X, xq, xd} is one stored 1250-byte tensor [0, 3], {R, rq, rd} one of 1244 [4, 7],
    #   C 1244 [3, 4]: step 3: 1250 + 1244 = 2494 (counting X and xq apart would give 2500 at
    #   step 1).
    assert graph_stats(graph1(qdq=True)) == dict(
        macs=11204, params=50, param_bytes=122, peak_activation_bytes=9976,
        peak_activation_bytes_int8=2494)


# ----------------------------------------------------------------------------- graph 2
# A branch: X (N, 64) -> MatMul W1 (64x200) -> H (1, 200); H -> MatMul W2 (200x50) -> P;
# H -> MatMul W3 (200x50) -> Q; Add(P, Q) -> S (1, 50); S -> MatMul W4 -> Y (1, 10), where
# W4 = DequantizeLinear(W4q int8 50x10, scale, zero point) runs first (node 0).
# Steps: 0 DQ, 1 MM1, 2 MM2, 3 MM3, 4 Add, 5 MM4.
# MACs: 64*200 + 200*50 + 200*50 + 50*10 = 12800 + 10000 + 10000 + 500 = 33300.
# params: 12800 + 10000 + 10000 + 500 = 33300 (the scale and zero point are not params).
# param_bytes: (12800 + 20000) * 4 + 500 * 1 + 4 (scale) + 1 (zero point) = 131705.
# liveness (elements): X [0, 1] 64, H [1, 3] 200, P [2, 4] 50, Q [3, 4] 50, S [4, 5] 50,
#   Y [5, end] 10; W4 (the DQ output) is a constant, not an activation.
#   step 1: X + H = 264; step 2: H + P = 250; step 3: H + P + Q = 300 (H still waits for
#   MM3, P for the Add); step 4: P + Q + S = 150; step 5: S + Y = 60 -> peak 300 elements,
#   1200 bytes. A naive sum would give 424 elements, the largest single tensor 200, freeing
#   H after its first consumer 164.
# With H also a graph output it stays alive to the end: step 4: H + P + Q + S = 350 -> 1400.

def graph2(h_is_output=False):
    rng = np.random.default_rng(1)
    inits = [_init('W1', rng.normal(size=(64, 200))), _init('W2', rng.normal(size=(200, 50))),
             _init('W3', rng.normal(size=(200, 50))),
             _init('W4q', rng.integers(-100, 100, (50, 10)), np.int8),
             _init('s4', 0.01), _init('z4', 0, np.int8)]
    nodes = [helper.make_node('DequantizeLinear', ['W4q', 's4', 'z4'], ['W4']),
             helper.make_node('MatMul', ['X', 'W1'], ['H']),
             helper.make_node('MatMul', ['H', 'W2'], ['P']),
             helper.make_node('MatMul', ['H', 'W3'], ['Q']),
             helper.make_node('Add', ['P', 'Q'], ['S']),
             helper.make_node('MatMul', ['S', 'W4'], ['Y'])]
    outputs = [helper.make_tensor_value_info('Y', FLOAT, ['N', 10])]
    if h_is_output:
        outputs.append(helper.make_tensor_value_info('H', FLOAT, ['N', 200]))
    return _model(nodes, [helper.make_tensor_value_info('X', FLOAT, ['N', 64])], outputs, inits)


def test_graph2_branch_liveness_hand_counts():
    expected = dict(macs=33300, params=33300, param_bytes=131705,
                    peak_activation_bytes=1200, peak_activation_bytes_int8=300)
    assert graph_stats(graph2()) == expected
    # Nodes stored out of order are sorted first (stable: the first ready node in file
    # order): MM1, MM3, MM2, Add, DQ, MM4, the same figures by symmetry.
    shuffled = graph2()
    nodes = list(shuffled.graph.node)[::-1]
    del shuffled.graph.node[:]
    shuffled.graph.node.extend(nodes)
    assert graph_stats(shuffled) == expected
    expected.update(peak_activation_bytes=1400, peak_activation_bytes_int8=350)
    assert graph_stats(graph2(h_is_output=True)) == expected


def test_path_and_model_give_the_same_figures(tmp_path):
    path = tmp_path / 'g2.onnx'
    onnx.save(graph2(), str(path))
    assert graph_stats(str(path)) == graph_stats(path) == graph_stats(graph2())


# ----------------------------------------------------------------------------- torch export

class _Tiny(nn.Module):
    """Like tests/conftest.py TinyNet with a second conv: input (N, 1, 1250, 1)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(1, 8, 9, stride=4)
        self.bn = nn.BatchNorm1d(8)
        self.conv2 = nn.Conv1d(8, 8, 5, stride=2)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x.squeeze(-1))))
        return self.fc(torch.relu(self.conv2(x)).mean(dim=2))


class _Reader:
    """A tiny calibration data reader (onnxruntime.quantization.CalibrationDataReader API)."""

    def __init__(self, name):
        x = np.random.default_rng(2).normal(size=(8, 1, 1250, 1)).astype(np.float32)
        self._batches = iter([{name: x[:4]}, {name: x[4:]}])

    def get_next(self):
        return next(self._batches, None)


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """{kind: path} of _Tiny exported the way ATML exports (opset 18, 'float') and quantized
    by onnxruntime: static QDQ (ATML's INT8 file, 'qdq'), static QOperator ('qoperator':
    QLinearConv, com.microsoft QGemm) and dynamic ('dynamic': ConvInteger, MatMulInteger)."""
    from onnxruntime.quantization import (QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp('graph-stats')
    paths = {kind: str(folder / f"{kind}.onnx")
             for kind in ('float', 'prepared', 'qdq', 'qoperator', 'dynamic')}
    float_path, prepared = paths['float'], paths['prepared']
    torch.manual_seed(0)
    model = _Tiny().eval()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter('ignore')
        torch.onnx.export(model, (torch.zeros(1, 1, 1250, 1),), float_path, dynamo=False,
                          opset_version=18, input_names=['input'], output_names=['output'],
                          dynamic_axes={'input': {0: 'batch'}, 'output': {0: 'batch'}},
                          do_constant_folding=True)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)       # per-tensor fallback warnings of the quantizer
    try:
        quant_pre_process(float_path, prepared, skip_symbolic_shape=True)
        for kind, quant_format in (('qdq', QuantFormat.QDQ),
                                   ('qoperator', QuantFormat.QOperator)):
            quantize_static(prepared, paths[kind], _Reader('input'), quant_format=quant_format,
                            per_channel=True, weight_type=QuantType.QInt8,
                            activation_type=QuantType.QUInt8)
        quantize_dynamic(prepared, paths['dynamic'], weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    return paths


# conv1: (1250 - 9) // 4 + 1 = 311 outputs per channel; conv2: (311 - 5) // 2 + 1 = 154.
L1, L2 = (1250 - 9) // 4 + 1, (311 - 5) // 2 + 1
TINY_MACS = 8 * L1 * (1 * 9) + 8 * L2 * (8 * 5) + 1 * 8 * 2      # conv1 + conv2 + fc = 71688


def test_torch_export_macs_match_the_hand_formula(exported):
    stats = graph_stats(exported['float'])
    assert stats['macs'] == TINY_MACS
    # The exporter folds the BatchNorm into conv1 (eval mode): conv1 72 + 8, conv2 320 + 8,
    # fc 16 + 2 = 426 float weights; the file adds two int64 axes constants (16 bytes).
    assert stats['params'] == 426
    assert stats['param_bytes'] == 426 * 4 + 16
    # Squeeze -> Conv -> Relu -> Conv -> Relu -> ReduceMean -> Gemm: the peak is at the first
    # Relu, its input and output (8 x 311 each) alive together.
    assert stats['peak_activation_bytes'] == 4 * 2 * 8 * L1
    assert stats['peak_activation_bytes_int8'] == 2 * 8 * L1


def test_int8_qdq_file_has_fewer_param_bytes_and_the_same_macs(exported):
    float_stats, int8_stats = graph_stats(exported['float']), graph_stats(exported['qdq'])
    ops = {n.op_type for n in onnx.load(exported['qdq']).graph.node}
    assert {'QuantizeLinear', 'DequantizeLinear', 'Conv', 'Gemm'} <= ops      # QDQ format
    assert int8_stats['macs'] == float_stats['macs'] == TINY_MACS
    assert int8_stats['params'] == float_stats['params']
    assert int8_stats['param_bytes'] < float_stats['param_bytes']
    assert int8_stats['peak_activation_bytes_int8'] <= int8_stats['peak_activation_bytes']


@pytest.mark.parametrize('kind, ops', [('qoperator', {'QLinearConv', 'QGemm'}),
                                       ('dynamic', {'ConvInteger', 'MatMulInteger'})])
def test_other_int8_formats_count_the_quantized_ops(exported, kind, ops):
    assert ops <= {n.op_type for n in onnx.load(exported[kind]).graph.node}
    stats = graph_stats(exported[kind])
    assert stats['macs'] == TINY_MACS
    assert stats['params'] == 426       # weights int8, biases int32 / float, no scales
    assert stats['param_bytes'] < graph_stats(exported['float'])['param_bytes']
