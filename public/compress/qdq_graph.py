"""The INT8 QDQ graph of a model: made by onnxruntime's static quantizer, and run in PyTorch
with trainable float weights (what quantization-aware training, public/compress/qat.py,
fine-tunes through).

    prepared = prepare_float_graph(model, in_channels, input_size, opset, tmp_dir)
    qdq = quantize_qdq(prepared, calibration_x)              # onnxruntime's INT8 QDQ graph
    graph = FakeQuantGraph(prepared, qdq)                    # an nn.Module: input (N, C, L, 1)
    logits = onnx_logits(qdq, x)                             # the same graph in onnxruntime

FakeQuantGraph interprets the QDQ graph node by node (OPS: one PyTorch function per ONNX
operator, ATTRIBUTE_RULES: the attribute values they implement). Each QuantizeLinear /
DequantizeLinear is a fake quantization with the scale and zero point onnxruntime chose
(straight-through gradient); each int8 weight or int32 bias is its trainable float weight,
quantized every step with onnxruntime's formula. onnxruntime's placement rules are read
from its output, not re-implemented (the module docstring of qat.py says why and what).
"""
import contextlib
import copy
import io
import math
import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

from public.compress.export import export_onnx
from public.compress.quantize import CalibrationSegments, quiet_root_logger
from public.core.errors import SettingsError


# ----------------------------------------------------------------------------- ONNX files

def prepare_float_graph(model, in_channels, input_size, opset, tmp):
    """The float graph onnxruntime quantizes: exported and pre-processed exactly as
    public/compress/quantize.py does, every node named and every initializer used once (the
    exporter shares equal tensors, e.g. a BatchNorm weight and another's running_var, and
    onnxruntime would then quantize the variance as a weight; integer shape constants
    stay shared)."""
    float_path, prepared_path = os.path.join(tmp, 'float.onnx'), os.path.join(tmp, 'prepared.onnx')
    export_onnx(copy.deepcopy(model), float_path, in_channels, input_size, opset)
    with quiet_root_logger():
        quant_pre_process(float_path, prepared_path, skip_symbolic_shape=True)
    prepared = onnx.load(prepared_path)
    graph = prepared.graph
    seen = set()
    for i, node in enumerate(graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.name or node.op_type}__{i}"
        seen.add(node.name)
    initializers = {t.name: t for t in graph.initializer
                    if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    uses = {}
    for node in graph.node:
        for slot, name in enumerate(node.input):
            if name in initializers:
                uses.setdefault(name, []).append((node, slot))
    for name, users in uses.items():
        for k, (node, slot) in enumerate(users[1:], start=1):
            copy_ = onnx.TensorProto()
            copy_.CopyFrom(initializers[name])
            copy_.name = f"{name}__use{k}"
            graph.initializer.append(copy_)
            node.input[slot] = copy_.name
    return prepared


def quantize_qdq(prepared, calibration_x, percentile=None, reduce_range=False):
    """onnxruntime's INT8 QDQ model of the float graph `prepared` (as public/compress/quantize.py
    writes it, before the names are compacted). percentile: activation ranges from that
    percentile of the calibration values (onnxruntime's Percentile calibration) instead of
    their min/max. reduce_range: 7-bit weights (public/compress/quantize.py)."""
    options = {}
    if percentile is not None:
        options = dict(calibrate_method=CalibrationMethod.Percentile,
                       extra_options={'CalibPercentile': float(percentile)})
        # onnxruntime's histogram collector stacks the batches' outputs: they must be of
        # one size, so a last, shorter batch is left out (256 segments are 8 whole ones).
        whole = len(calibration_x) - len(calibration_x) % 32
        calibration_x = calibration_x[:whole] if whole else calibration_x
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, 'prepared.onnx'), os.path.join(tmp, 'int8.onnx')
        onnx.save(prepared, src)
        # Percentile calibration prints its progress; the run's log has no use for it.
        with quiet_root_logger(), contextlib.redirect_stdout(io.StringIO()):
            quantize_static(src, dst, CalibrationSegments(prepared.graph.input[0].name, calibration_x),
                            quant_format=QuantFormat.QDQ, per_channel=True,
                            weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                            reduce_range=bool(reduce_range), **options)
        return onnx.load(dst)


def _session(model_proto):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model_proto.SerializeToString(), options,
                                providers=['CPUExecutionProvider'])


def onnx_logits(model_proto, x, batch_size=1024):
    """Logits of an ONNX model (a ModelProto) on x ((N, C, L) array), run by onnxruntime."""
    session = _session(model_proto)
    name = session.get_inputs()[0].name
    x = np.asarray(x, dtype=np.float32)[..., None]
    return np.concatenate([session.run(None, {name: x[i:i + batch_size]})[0]
                           for i in range(0, len(x), batch_size)])


# ----------------------------------------------------------------------------- the graph in PyTorch

def node_attributes(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _ste_round(v):
    return v + (torch.round(v) - v).detach()


_INT_RANGE = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127),
              np.dtype(np.uint16): (0, 65535), np.dtype(np.int16): (-32768, 32767)}


def _channel_view(scale, axis, rank):
    if scale.dim() == 0 or scale.numel() == 1 or axis is None:
        return scale.reshape(())
    shape = [1] * rank
    shape[axis % rank] = -1
    return scale.reshape(shape)


def int8_weight_scale(weight, axis, qmax=127):
    """onnxruntime's symmetric int8 weight scale: max |w| / qmax per channel along axis (per
    tensor when axis is None), computed in float64 and stored as float32; 1.0 for zeros.
    qmax: 127, or 64 with reduce_range."""
    magnitude = weight.detach().abs()
    if axis is None:
        absmax = magnitude.max()
    else:
        dims = [d for d in range(weight.dim()) if d != axis % weight.dim()]
        absmax = magnitude.amax(dim=dims) if dims else magnitude
    scale = (absmax.double() * 2.0 / float(2 * qmax)).float()
    return torch.where(scale.double() < np.finfo(np.float32).tiny, torch.ones_like(scale), scale)


class FakeQuantGraph(nn.Module):
    """An onnxruntime INT8 QDQ graph run in PyTorch, with the float weights it quantizes as
    trainable parameters (see the module docstring). Input (N, C, L, 1), output logits."""

    def __init__(self, prepared, qdq, reduce_range=False):
        super().__init__()
        self.prepared = prepared
        self.reduce_range = bool(reduce_range)
        self.weight_qmax = 64 if self.reduce_range else 127     # onnxruntime's weight range
        self.input_name = prepared.graph.input[0].name
        self.output_name = prepared.graph.output[0].name
        self._param_keys = {}                 # float initializer name -> parameter key
        self.weights = nn.ParameterDict()
        self.qdq = None
        # For diagnosis (quantization_sensitivity): scale initializers whose
        # QuantizeLinear/DequantizeLinear pass values through unrounded, and whether the
        # weights stay float.
        self.unquantized = set()
        self.float_weights = False
        self.load_qdq(qdq)

    # -- building

    def load_qdq(self, qdq):
        """Run `qdq` from now on (the same graph re-calibrated: new activation scales)."""
        graph = qdq.graph
        if graph.output[0].name != self.output_name:
            raise RuntimeError(f"onnxruntime renamed the output {self.output_name!r}")
        device = next(iter(self.weights.values())).device if len(self.weights) else None
        consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        float_inits = {t.name: t for t in self.prepared.graph.initializer}
        prepared_nodes = {n.name: n for n in self.prepared.graph.node}
        producer = {out: node for node in graph.node for out in node.output}
        # Where does each DequantizeLinear of an initializer come from in the float graph?
        sources = {}
        for node in graph.node:
            if node.op_type in ('QuantizeLinear', 'DequantizeLinear'):
                continue
            float_node = prepared_nodes.get(node.name)
            for slot, name in enumerate(node.input):
                dq = producer.get(name)
                if (dq is None or dq.op_type != 'DequantizeLinear' or dq.input[0] not in consts
                        or float_node is None or slot >= len(float_node.input)):
                    continue
                if float_node.input[slot] in float_inits:
                    sources[dq.output[0]] = (float_node.input[slot], node, slot)
        int8_outputs = {out for out, (name, _, _) in sources.items()
                        if consts[producer[out].input[0]].dtype == np.int8}
        weight_steps, bias_steps, steps = [], [], []
        for node in graph.node:
            attrs = node_attributes(node)
            if node.op_type == 'DequantizeLinear' and node.output[0] in sources:
                float_name, user, slot = sources[node.output[0]]
                kind = consts[node.input[0]].dtype
                if kind == np.int8:
                    key = self._parameter(float_name, float_inits[float_name], device)
                    axis = attrs.get('axis', 1) if consts[node.input[1]].size > 1 else None
                    weight_steps.append(('weight', node.output[0], key, axis, node.input[1]))
                    continue
                act_dq = producer.get(user.input[0])
                if (kind == np.int32 and slot == 2 and user.input[1] in int8_outputs
                        and act_dq is not None and act_dq.op_type == 'DequantizeLinear'):
                    key = self._parameter(float_name, float_inits[float_name], device)
                    bias_steps.append(('bias', node.output[0], key, act_dq.input[1],
                                       user.input[1], node.input[1]))
                    continue
                # any other quantized initializer is a constant: run as onnxruntime stores it
            if node.op_type not in OPS:
                raise SettingsError(f"QAT cannot run ONNX operator {node.op_type!r} (node "
                                    f"{node.name!r}) of onnxruntime's INT8 graph")
            steps.append(('op', node.op_type, list(node.input), list(node.output), attrs))
        self.consts = {name: torch.from_numpy(np.array(value)) for name, value in consts.items()}
        if device is not None:
            self.consts = {k: v.to(device) for k, v in self.consts.items()}
        self.plan = weight_steps + bias_steps + steps
        self.qdq = qdq
        return self

    def _parameter(self, float_name, tensor, device):
        key = self._param_keys.get(float_name)
        if key is None:
            key = self._param_keys[float_name] = f"w{len(self._param_keys)}"
            value = torch.from_numpy(numpy_helper.to_array(tensor).astype(np.float32).copy())
            self.weights[key] = nn.Parameter(value.to(device) if device is not None else value)
        return key

    def to(self, *args, **kwargs):
        super().to(*args, **kwargs)
        if len(self.weights):
            device = next(iter(self.weights.values())).device
            self.consts = {k: v.to(device) for k, v in self.consts.items()}
        return self

    # -- running

    def forward(self, x):
        env = dict(self.consts)
        env[self.input_name] = x
        scales = {}
        for step in self.plan:
            if step[0] == 'weight':
                _, out, key, axis, _ = step
                weight = self.weights[key]
                scale = int8_weight_scale(weight, axis, self.weight_qmax)
                s = _channel_view(scale, axis, weight.dim())
                q = torch.clamp(torch.round(weight.detach() / s), -self.weight_qmax,
                                self.weight_qmax)
                env[out] = weight if self.float_weights else weight + (q * s - weight).detach()
                scales[out] = scale
            elif step[0] == 'bias':
                _, out, key, act_scale, weight_out, _ = step
                bias = self.weights[key]
                scale = (env[act_scale].float() * scales[weight_out]).reshape(-1)
                if scale.numel() == 1:
                    scale = scale.reshape(())
                q = torch.clamp(torch.round(bias.detach().double() / scale.double()),
                                -2.0 ** 31, 2.0 ** 31 - 1)
                quantized = bias + (q.float() * scale - bias).detach()
                env[out] = bias if self.float_weights else quantized
            else:
                _, op, inputs, outputs, attrs = step
                values = [env[name] if name else None for name in inputs]
                if op in ('QuantizeLinear', 'DequantizeLinear') and inputs[1] in self.unquantized:
                    env[outputs[0]] = values[0]
                    continue
                results = OPS[op](attrs, *values)
                if not isinstance(results, (list, tuple)):
                    results = (results,)
                for name, value in zip(outputs, results):
                    env[name] = value
        return env[self.output_name]

    # -- writing

    def float_model(self):
        """The prepared float graph with the current (fine-tuned) weights."""
        model = onnx.ModelProto()
        model.CopyFrom(self.prepared)
        for tensor in model.graph.initializer:
            key = self._param_keys.get(tensor.name)
            if key is not None:
                value = self.weights[key].detach().cpu().numpy().astype(np.float32)
                tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
        return model

    def recalibrate(self, calibration_x, percentile=None):
        """Let onnxruntime quantize the current weights (new activation ranges) and run that."""
        return self.load_qdq(quantize_qdq(self.float_model(), calibration_x, percentile,
                                       self.reduce_range))

    def weight_mismatch(self):
        """Largest |simulated - onnxruntime| over the dequantized int8 weights and int32
        biases of the loaded graph (0 when the simulation is exact)."""
        worst = 0.0
        with torch.no_grad():
            scales, env = {}, dict(self.consts)
            for step in self.plan:
                if step[0] == 'weight':
                    _, out, key, axis, scale_name = step
                    weight = self.weights[key]
                    scale = int8_weight_scale(weight, axis, self.weight_qmax)
                    scales[out] = scale
                    s = _channel_view(scale, axis, weight.dim())
                    simulated = torch.clamp(torch.round(weight / s), -self.weight_qmax,
                                            self.weight_qmax) * s
                elif step[0] == 'bias':
                    _, out, key, act_scale, weight_out, scale_name = step
                    scale = (env[act_scale].float() * scales[weight_out]).reshape(-1)
                    q = torch.round(self.weights[key].double() / scale.double())
                    simulated = q.float() * scale
                else:
                    continue
                stored = [n for n in self.qdq.graph.node if n.output[0] == out][0]
                expected = OPS['DequantizeLinear'](node_attributes(stored),
                                                    *[env[i] for i in stored.input])
                worst = max(worst, float((simulated.reshape(expected.shape) - expected)
                                         .abs().max()))
        return worst


# ----------------------------------------------------------------------------- ONNX operators

def _axes(attrs, values, rank):
    axes = attrs.get('axes')
    if axes is None and len(values) > 1 and values[1] is not None:
        axes = values[1].tolist()
    if axes is None:
        return None
    return sorted(int(a) % rank for a in axes)


def _reduce(fn):
    def run(attrs, x, axes=None):
        dims = _axes(attrs, (x, axes), x.dim())
        keep = bool(attrs.get('keepdims', 1))
        if dims is None:
            if attrs.get('noop_with_empty_axes', 0):
                return x
            dims = list(range(x.dim()))
        return fn(x, dims, keep)
    return run


def _prod(x, dims, keep):
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, dim=d, keepdim=keep)
    return x


def _quantize_linear(attrs, x, scale, zero_point=None):
    zero_point = zero_point if zero_point is not None else torch.zeros((), dtype=torch.uint8)
    low, high = _INT_RANGE[np.dtype(str(zero_point.dtype).replace('torch.', ''))]
    axis = attrs.get('axis', 1)
    s = _channel_view(scale.float(), axis, x.dim())
    z = _channel_view(zero_point.float(), axis, x.dim())
    return torch.clamp(_ste_round(x / s) + z, low, high)


def _dequantize_linear(attrs, q, scale, zero_point=None):
    axis = attrs.get('axis', 1)
    s = _channel_view(scale.float(), axis, q.dim())
    z = _channel_view(zero_point.float(), axis, q.dim()) if zero_point is not None else 0.0
    return (q.float() - z) * s


def _pads(attrs, spatial):
    pads = list(attrs.get('pads', [0] * 2 * spatial))
    return pads[:spatial], pads[spatial:]


def _conv(attrs, x, w, b=None):
    spatial = w.dim() - 2
    begin, end = _pads(attrs, spatial)
    stride = list(attrs.get('strides', [1] * spatial))
    dilation = list(attrs.get('dilations', [1] * spatial))
    if begin != end:
        x = F.pad(x, [p for pair in zip(reversed(begin), reversed(end)) for p in pair])
        begin = [0] * spatial
    conv = {1: F.conv1d, 2: F.conv2d}[spatial]
    return conv(x, w, b, stride, begin, dilation, attrs.get('group', 1))


def _pool(kind):
    def run(attrs, x):
        spatial = x.dim() - 2
        kernel = list(attrs['kernel_shape'])
        stride = list(attrs.get('strides', [1] * spatial))
        begin, end = _pads(attrs, spatial)
        ceil = bool(attrs.get('ceil_mode', 0))
        if begin != end:
            fill = -math.inf if kind == 'max' else 0.0
            x = F.pad(x, [p for pair in zip(reversed(begin), reversed(end)) for p in pair],
                      value=fill)
            begin = [0] * spatial
        if kind == 'max':
            fn = {1: F.max_pool1d, 2: F.max_pool2d}[spatial]
            return fn(x, kernel, stride, begin, list(attrs.get('dilations', [1] * spatial)), ceil)
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d}[spatial]
        return fn(x, kernel, stride, begin, ceil, bool(attrs.get('count_include_pad', 0)))
    return run


def _gemm(attrs, a, b, c=None):
    a = a.transpose(-1, -2) if attrs.get('transA', 0) else a
    b = b.transpose(-1, -2) if attrs.get('transB', 0) else b
    y = attrs.get('alpha', 1.0) * (a @ b)
    return y if c is None else y + attrs.get('beta', 1.0) * c


def _reshape(attrs, x, shape):
    shape = [int(s) for s in shape.tolist()]
    if not attrs.get('allowzero', 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _squeeze(attrs, x, axes=None):
    dims = _axes(attrs, (x, axes), x.dim())
    if dims is None:
        return x.squeeze()
    for d in sorted(dims, reverse=True):
        x = x.squeeze(d)
    return x


def _unsqueeze(attrs, x, axes=None):
    axes = attrs.get('axes') if axes is None else axes.tolist()
    rank = x.dim() + len(axes)
    for d in sorted(int(a) % rank for a in axes):
        x = x.unsqueeze(d)
    return x


def _flatten(attrs, x):
    axis = attrs.get('axis', 1) % max(1, x.dim()) if x.dim() else 0
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _gather(attrs, data, indices):
    axis = attrs.get('axis', 0) % data.dim()
    idx = indices.long() % data.shape[axis]
    out = torch.index_select(data, axis, idx.reshape(-1))
    shape = tuple(data.shape[:axis]) + tuple(indices.shape) + tuple(data.shape[axis + 1:])
    return out.reshape(shape)


def _slice(attrs, data, starts, ends, axes=None, steps=None):
    axes = list(range(len(starts))) if axes is None else axes.tolist()
    steps = [1] * len(axes) if steps is None else steps.tolist()
    index = [slice(None)] * data.dim()
    for start, end, axis, step in zip(starts.tolist(), ends.tolist(), axes, steps):
        if step < 0:
            raise SettingsError("QAT cannot run a Slice with a negative step")
        index[axis % data.dim()] = slice(int(start), int(min(end, 2 ** 62)), int(step))
    return data[tuple(index)]


def _divide(attrs, a, b):
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode='trunc')
    return a / b


def _constant(attrs):
    if 'value' in attrs:
        return torch.from_numpy(numpy_helper.to_array(attrs['value']).copy())
    for key, dtype in (('value_float', torch.float32), ('value_floats', torch.float32),
                       ('value_int', torch.int64), ('value_ints', torch.int64)):
        if key in attrs:
            return torch.tensor(attrs[key], dtype=dtype)
    raise SettingsError(f"QAT cannot run a Constant with attributes {sorted(attrs)}")


def _cast(attrs, x):
    dtype = helper.tensor_dtype_to_np_dtype(attrs['to'])
    return x.to(getattr(torch, np.dtype(dtype).name))


def _clip(attrs, x, low=None, high=None):
    return torch.clamp(x, low, high)


def _batch_norm(attrs, x, scale, bias, mean, var):
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, attrs.get('epsilon', 1e-5))


OPS = {
    'QuantizeLinear': _quantize_linear,
    'DequantizeLinear': _dequantize_linear,
    'Conv': _conv,
    'Gemm': _gemm,
    'MatMul': lambda attrs, a, b: a @ b,
    'BatchNormalization': _batch_norm,
    'Relu': lambda attrs, x: F.relu(x),
    'LeakyRelu': lambda attrs, x: F.leaky_relu(x, attrs.get('alpha', 0.01)),
    'Sigmoid': lambda attrs, x: torch.sigmoid(x),
    'Tanh': lambda attrs, x: torch.tanh(x),
    'Softmax': lambda attrs, x: torch.softmax(x, attrs.get('axis', -1)),
    'Clip': _clip,
    'Add': lambda attrs, a, b: a + b,
    'Sub': lambda attrs, a, b: a - b,
    'Mul': lambda attrs, a, b: a * b,
    'Div': _divide,
    'Pow': lambda attrs, a, b: torch.pow(a, b),
    'Sqrt': lambda attrs, x: torch.sqrt(x),
    'Neg': lambda attrs, x: -x,
    'Exp': lambda attrs, x: torch.exp(x),
    'ReduceMean': _reduce(lambda x, d, k: x.mean(dim=d, keepdim=k)),
    'ReduceSum': _reduce(lambda x, d, k: x.sum(dim=d, keepdim=k)),
    'ReduceMax': _reduce(lambda x, d, k: x.amax(dim=d, keepdim=k)),
    'ReduceMin': _reduce(lambda x, d, k: x.amin(dim=d, keepdim=k)),
    'ReduceProd': _reduce(_prod),
    'GlobalAveragePool': lambda attrs, x: x.mean(dim=list(range(2, x.dim())), keepdim=True),
    'MaxPool': _pool('max'),
    'AveragePool': _pool('avg'),
    'Flatten': _flatten,
    'Reshape': _reshape,
    'Squeeze': _squeeze,
    'Unsqueeze': _unsqueeze,
    'Transpose': lambda attrs, x: x.permute(*attrs['perm']) if 'perm' in attrs else x.permute(
        *reversed(range(x.dim()))),
    'Concat': lambda attrs, *xs: torch.cat(xs, dim=attrs['axis']),
    'Identity': lambda attrs, x: x,
    'Constant': _constant,
    'Shape': lambda attrs, x: torch.tensor(x.shape[attrs.get('start', 0):attrs.get('end', None)],
                                           dtype=torch.int64),
    'Gather': _gather,
    'Slice': _slice,
    'Cast': _cast,
}

# Attribute values the operators above implement (first = the ONNX default).
ATTRIBUTE_RULES = {
    'Conv': {'auto_pad': (b'NOTSET', 'NOTSET')},
    'MaxPool': {'auto_pad': (b'NOTSET', 'NOTSET'), 'storage_order': (0,)},
    'AveragePool': {'auto_pad': (b'NOTSET', 'NOTSET')},
    'BatchNormalization': {'training_mode': (0,)},
}
