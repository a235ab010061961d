"""Quantization-aware training (QAT): fine-tune a trained model through the very INT8 graph
onnxruntime will run, then write that INT8 model.

    check_quantizable(model)          # SettingsError naming what QAT cannot quantize, and where
    int8_bytes = qat_int8(model, data, lr, settings, epochs, calibration_x, 'saved.int8.onnx',
                          in_channels=1, input_size=1250, opset=18)

How. The model is exported (public/export.py) and prepared as public/quantize.py prepares
it, and onnxruntime's own static quantizer writes the INT8 QDQ graph (per-channel int8
weights, uint8 activations, calibrated on `calibration_x`), as post-training quantization
(PTQ) does. `FakeQuantGraph` then runs *that graph* in PyTorch: each QuantizeLinear /
DequantizeLinear is a fake quantization with the scale and zero point onnxruntime chose
(straight-through gradient), and each int8 weight or int32 bias is its trainable float
weight, quantized every step with onnxruntime's formula. So fine-tuning sees exactly the
quantization the exported file does, wherever onnxruntime put it: BatchNorm kept after
SiLU (AFNet) or folded into the Conv by the pre-processing (SepNet), ReLU removed into the
uint8 range, scales shared by Flatten and Unsqueeze, the logits themselves quantized.
onnxruntime's placement rules are read from its output, not re-implemented. Weights are
int8 in [-127, 127], or [-64, 64] with settings.INT8_REDUCE_RANGE (the default; see
public/quantize.py: on x86 CPUs without VNNI, onnxruntime's kernels saturate full-range
weights, and no fine-tuning of the exact arithmetic can make up for that).

The loss is train_model's (CrossEntropyLoss for class labels, BCEWithLogitsLoss for
multi-hot labels) against the float model's own probabilities (distillation): INT8 should
behave like the float model that was measured and chosen, and fitting the labels again
only drifts from the early-stopped optimum. Activation ranges are onnxruntime's
calibration of the current weights, redone every RECALIBRATE_STEPS steps and after each
epoch. Each epoch's INT8 file is run in onnxruntime on the validation data and the one
with the lowest validation loss (the KL divergence from the float model) is kept. Epoch 0
is the better (on validation) of two files without fine-tuning: public/quantize.py's
(min/max ranges) and one with ranges at the 99.99th percentile (RANGES); fine-tuning starts
from it and keeps its range method. So QAT never returns a file further from the float
model on validation than PTQ's. BatchNorm statistics stay frozen
(inference-mode BatchNorm is what the file computes) and the exported graph has no
Dropout, so fine-tuning runs without it.

Why PTQ loses accuracy on the stage-two AFNet (bench/bench_qat.py, quantization_sensitivity):
the error is in the activations, not the weights (with float weights the INT8 model is as
far from the float model as before; with float activations it is ~0). Every activation is
quantized per tensor to uint8 with public/quantize.py's MinMax ranges, and a few values
per million (0.01 %) of the 256 calibration segments stretch the range of SiLU and
BatchNorm outputs up to 2x, doubling the step for everything else. The Conv -> SiLU ->
BatchNorm order adds to it: BatchNorm after SiLU cannot be folded into the Conv, so each
block quantizes the Conv output, the sigmoid, the SiLU product and the BatchNorm output
(4 roundings instead of 1) and BatchNorm scales its input's rounding error by
gamma / sqrt(var). The largest single sources are the first blocks' Conv / SiLU outputs.
The errors move the two logits against each other, so the decision threshold shifts and
the min-metric (min of recall, precision, ...) moves by several points either way while
ROC AUC barely changes. Where min/max ranges hurt most, ranges at the 99.99th percentile
cut the KL divergence from the float model 2-5x by themselves (where they are already
tight, clipping can cost instead, hence both are tried); fine-tuning through the graph
lowers it further.

Limit (measured, bench/results/qat_*.txt): ranges are calibrated on training segments, so
a subject unlike every training subject (in the shared data S61, whose ECG is inverted)
drives activations past them; the saturated INT8 model then disagrees with the float model
on many of its segments, more with percentile ranges than with min/max. Neither
validation nor QAT can see such a subject; read the INT8 model's per-subject results.
"""
import copy
import math
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn

from public.errors import SettingsError

RECALIBRATE_STEPS = 100          # training steps between onnxruntime re-calibrations of the ranges
RANGES = (None, 99.99)           # activation ranges tried: None = min/max of the calibration
                                 # values (public/quantize.py), a number = that percentile

# torch.nn layer types QAT handles. Layers defined outside torch (the project's own blocks)
# are judged by the ONNX operators they export to (_OPS below).
SUPPORTED_MODULES = (
    nn.Sequential, nn.ModuleList, nn.ModuleDict,
    nn.Conv1d, nn.Linear, nn.BatchNorm1d,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Softmax,
    nn.Dropout, nn.Flatten, nn.Identity, nn.MaxPool1d, nn.AvgPool1d,
)


# ----------------------------------------------------------------------------- checks

def check_quantizable(model, in_channels=None, input_size=None, opset=18):
    """Raise SettingsError naming the first layer (type and module path) or ONNX operator
    QAT cannot quantize. Layers are checked by type; with in_channels and input_size the
    model is also exported and every operator of its graph checked."""
    for path, module in model.named_modules():
        kind = type(module)
        if kind.__module__.startswith('torch.') and kind not in SUPPORTED_MODULES:
            raise SettingsError(
                f"QAT (QAT_EPOCHS > 0) cannot quantize module {path or '(model)'!r} of type "
                f"{kind.__module__}.{kind.__name__}; supported torch.nn layers: "
                f"{', '.join(sorted(t.__name__ for t in SUPPORTED_MODULES))}. "
                f"Set QAT_EPOCHS=0 (post-training INT8 only) for this model")
    if in_channels is not None and input_size is not None:
        with tempfile.TemporaryDirectory() as tmp:
            _check_operators(_prepare(model, in_channels, input_size, opset, tmp), model)


def _check_operators(prepared, model):
    for node in prepared.graph.node:
        if node.domain not in ('', 'ai.onnx') or node.op_type not in _OPS:
            raise _unsupported(model, node, '', f"supported operators: {', '.join(sorted(_OPS))}",
                               ' (post-training INT8 only)')
        for attribute, allowed in _ATTRIBUTE_RULES.get(node.op_type, {}).items():
            value = _attributes(node).get(attribute, allowed[0])
            if value not in allowed:
                raise _unsupported(model, node, f" with {attribute}={value!r}",
                                   f"supported: {attribute} in {list(allowed)}")


def _unsupported(model, node, detail, supported, fallback=''):
    path, kind = _module_of(model, node.name)
    return SettingsError(
        f"QAT (QAT_EPOCHS > 0) cannot quantize ONNX operator {node.op_type!r}{detail} "
        f"(node {node.name!r}, from module {path or '(model)'!r} of type {kind}); "
        f"{supported}. Set QAT_EPOCHS=0{fallback} for this model")


def _module_of(model, node_name):
    """(module path, type name) of the layer an exported node came from: the TorchScript
    exporter names nodes by scope, '/features/features.3/fc1/Gemm'."""
    path = ''
    for part in node_name.strip('/').split('/')[:-1]:
        for candidate in (f"{path}.{part}" if path else part, part):
            try:
                model.get_submodule(candidate)
            except AttributeError:
                continue
            path = candidate
            break
    return path, type(model.get_submodule(path)).__name__


# ----------------------------------------------------------------------------- ONNX files

def _prepare(model, in_channels, input_size, opset, tmp):
    """The float graph onnxruntime quantizes: exported and pre-processed exactly as
    public/quantize.py does, every node named and every initializer used once (the
    exporter shares equal tensors, e.g. a BatchNorm weight and another's running_var, and
    onnxruntime would then quantize the variance as a weight; integer shape constants
    stay shared)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process
    from public.export import export_onnx
    from public.quantize import _quiet_root_logger
    float_path, prepared_path = os.path.join(tmp, 'float.onnx'), os.path.join(tmp, 'prepared.onnx')
    export_onnx(copy.deepcopy(model), float_path, in_channels, input_size, opset)
    with _quiet_root_logger():
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


def _quantize(prepared, calibration_x, percentile=None, reduce_range=False):
    """onnxruntime's INT8 QDQ model of the float graph `prepared` (as public/quantize.py
    writes it, before the names are compacted). percentile: activation ranges from that
    percentile of the calibration values (onnxruntime's Percentile calibration) instead of
    their min/max. reduce_range: 7-bit weights (public/quantize.py)."""
    import contextlib
    import io
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from public.quantize import _quiet_root_logger, _Segments
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
        with _quiet_root_logger(), contextlib.redirect_stdout(io.StringIO()):
            quantize_static(src, dst, _Segments(prepared.graph.input[0].name, calibration_x),
                            quant_format=QuantFormat.QDQ, per_channel=True,
                            weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                            reduce_range=bool(reduce_range), **options)
        return onnx.load(dst)


def _session(model_proto):
    import onnxruntime as ort
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

def _attributes(node):
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
            attrs = _attributes(node)
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
            if node.op_type not in _OPS:
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
                results = _OPS[op](attrs, *values)
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
        return self.load_qdq(_quantize(self.float_model(), calibration_x, percentile,
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
                expected = _OPS['DequantizeLinear'](_attributes(stored),
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


_OPS = {
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
_ATTRIBUTE_RULES = {
    'Conv': {'auto_pad': (b'NOTSET', 'NOTSET')},
    'MaxPool': {'auto_pad': (b'NOTSET', 'NOTSET'), 'storage_order': (0,)},
    'AveragePool': {'auto_pad': (b'NOTSET', 'NOTSET')},
    'BatchNormalization': {'training_mode': (0,)},
}


# ----------------------------------------------------------------------------- training

@dataclass
class QATOutcome:
    """What fine-tuning produced: the fake-quantized graph at the kept epoch and its file."""
    graph: FakeQuantGraph          # weights and ranges of the kept epoch
    int8: onnx.ModelProto          # onnxruntime's INT8 QDQ model of those weights
    best_epoch: int                # 0 = post-training quantization was best
    history: list = field(default_factory=list)   # (epoch, train_loss, val_loss of the INT8 file)
    percentile: float = None       # the activation ranges used (None = min/max)
    start_losses: dict = field(default_factory=dict)   # validation loss of each range method


class _Objective:
    """The QAT loss: the loss train_model uses, chosen by the labels (CrossEntropyLoss for
    class labels (N,), BCEWithLogitsLoss for multi-hot labels (N, K)), against targets that
    mix the labels with the float model's own probabilities (knowledge distillation):
    target = label_weight * label + (1 - label_weight) * teacher probability."""

    def __init__(self, teacher, data, settings, label_weight, device):
        y = data.y_train
        self.multilabel = bool(y.is_floating_point() and y.dim() == 2)
        self.teacher = teacher
        self.label_weight = float(label_weight)
        from public.training import num_classes_of
        self.num_classes = num_classes_of(teacher, data)
        weights = None
        if not self.multilabel and getattr(settings, 'CLASS_WEIGHTS', 'none') == 'balanced':
            from public.recipe import class_weights
            weights = class_weights(y, self.num_classes).to(device)
        self.criterion = (nn.BCEWithLogitsLoss() if self.multilabel
                          else nn.CrossEntropyLoss(weight=weights))

    @torch.no_grad()
    def targets(self, x, y):
        """Targets of a batch x (N, C, L, 1) with labels y."""
        labels = y.float() if self.multilabel else F.one_hot(y, self.num_classes).float()
        if self.label_weight >= 1.0:
            return labels
        logits = self.teacher(x).float()
        soft = torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=1)
        return self.label_weight * labels + (1.0 - self.label_weight) * soft

    def loss(self, logits, targets):
        """The criterion minus the targets' own entropy: the KL divergence from the targets
        (0 when the INT8 model reproduces them), so the figures read alike for any mix."""
        return self.criterion(logits, targets) - self._entropy(targets)

    def _entropy(self, targets):
        xlogx = torch.special.xlogy
        if self.multilabel:
            return -(xlogx(targets, targets) + xlogx(1 - targets, 1 - targets)).mean()
        terms = xlogx(targets, targets)
        weights = getattr(self.criterion, 'weight', None)
        if weights is not None:
            # CrossEntropyLoss with class weights and probability targets weights each class
            # term; the entropy is weighted the same way so the difference stays >= 0.
            terms = terms * weights
        return -terms.sum(dim=1).mean()


def _int8_val_loss(int8, data, objective, val_targets):
    if not len(data.x_val):
        return math.inf          # nothing to validate on: every epoch's training loss decides
    logits = torch.from_numpy(onnx_logits(int8, data.x_val.cpu().numpy()))
    with torch.no_grad():
        objective.criterion.cpu()
        loss = float(objective.loss(logits, val_targets.cpu()))
        objective.criterion.to(val_targets.device)
        return loss


def _val_targets(objective, data, device, batch_size=1024):
    x, y = data.x_val, data.y_val
    parts = [objective.targets(x[i:i + batch_size].to(device).unsqueeze(-1),
                               y[i:i + batch_size].to(device))
             for i in range(0, len(x), batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0)


def qat_finetune(model, data, lr, settings, epochs, calibration_x, in_channels, input_size,
                 opset, device=torch.device('cpu'), label_weight=0.0, ranges=RANGES):
    """Fine-tune `model` (not modified) through its onnxruntime INT8 graph; QATOutcome.
    label_weight: 0 = learn the float model's outputs (distillation, the default), 1 = the
    labels, in between a mix. ranges: how activation ranges are calibrated (None = min/max,
    a number = that percentile); each is tried and the one whose INT8 file has the lower
    validation loss is fine-tuned (ranges=(None,), epochs=0 writes public/quantize.py's
    file byte for byte)."""
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
        raise SettingsError(f"QAT_EPOCHS must be an int >= 0, got QAT_EPOCHS={epochs!r}")
    if not 0.0 <= label_weight <= 1.0:
        raise SettingsError(f"label_weight must be in [0, 1], got label_weight={label_weight!r}")
    if not ranges or any(r is not None and not 0 < r <= 100 for r in ranges):
        raise SettingsError(f"ranges must hold None or percentiles in (0, 100], got "
                            f"ranges={ranges!r}")
    check_quantizable(model)
    reduce_range = getattr(settings, 'INT8_REDUCE_RANGE', False)
    calibration_x = np.asarray(calibration_x, dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = _prepare(model, in_channels, input_size, opset, tmp)
    _check_operators(prepared, model)
    teacher = copy.deepcopy(model).to(device).eval().requires_grad_(False)
    objective = _Objective(teacher, data, settings, label_weight, device)
    val_targets = _val_targets(objective, data, device)
    starts = {}
    for percentile in ranges:
        int8 = _quantize(prepared, calibration_x, percentile, reduce_range)
        starts[percentile] = (_int8_val_loss(int8, data, objective, val_targets), int8)
    percentile = min(starts, key=lambda p: (starts[p][0], ranges.index(p)))
    best_loss, int8 = starts[percentile]
    graph = FakeQuantGraph(prepared, int8, reduce_range).to(device)
    best = (0, copy.deepcopy(graph.weights.state_dict()), graph.qdq)
    history = [(0, math.nan, best_loss)]
    if epochs:
        best, history = _train(graph, data, lr, settings, epochs,
                               lambda: graph.recalibrate(calibration_x, percentile), objective,
                               val_targets, device, best, history)
    epoch, state, int8 = best
    graph.weights.load_state_dict(state)
    graph.load_qdq(int8)
    return QATOutcome(graph=graph.eval(), int8=int8, best_epoch=epoch, history=history,
                      percentile=percentile,
                      start_losses={p: loss for p, (loss, _) in starts.items()})


def _train(graph, data, lr, settings, epochs, recalibrate, objective, val_targets, device,
           best, history):
    from public.recipe import Augmenter
    from public.training import EarlyStopping
    augment = Augmenter(settings.SEED, device) if getattr(settings, 'AUGMENT', False) else None
    generator = torch.Generator().manual_seed(settings.SEED)
    optimizer = torch.optim.AdamW(graph.parameters(), lr=lr,
                                  weight_decay=settings.WEIGHT_DECAY)
    batch_size = settings.BATCH_SIZE
    steps_per_epoch = -(-len(data.x_train) // batch_size)
    total = max(1, epochs * steps_per_epoch)
    # Cosine decay to zero: fine-tuning from a trained model, the weights should settle.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total)))
    stopper = EarlyStopping(settings.PATIENCE, settings.OVERFIT_GAP)
    stopper.step(0, history[0][2], history[0][2])
    x_train = data.x_train.unsqueeze(-1)
    step = 0
    for epoch in range(1, epochs + 1):
        graph.train()
        order = torch.randperm(len(x_train), generator=generator)
        running, seen = 0.0, 0
        for start in range(0, len(order), batch_size):
            if step and step % RECALIBRATE_STEPS == 0:
                recalibrate()
            idx = order[start:start + batch_size].to(device)
            xb, yb = x_train.index_select(0, idx), data.y_train.index_select(0, idx)
            if augment is not None:
                xb = augment(xb.squeeze(-1)).unsqueeze(-1)
            optimizer.zero_grad(set_to_none=True)
            loss = objective.loss(graph(xb), objective.targets(xb, yb))
            loss.backward()
            optimizer.step()
            scheduler.step()
            running += float(loss.detach()) * len(idx)
            seen += len(idx)
            step += 1
        recalibrate()
        train_loss = running / max(1, seen)
        val_loss = _int8_val_loss(graph.qdq, data, objective, val_targets)
        if not len(data.x_val):
            val_loss = train_loss
        history.append((epoch, train_loss, val_loss))
        improved, stop, _ = stopper.step(epoch, train_loss, val_loss)
        if improved:
            best = (epoch, copy.deepcopy(graph.weights.state_dict()), graph.qdq)
        if stop:
            break
    return best, history


def quantization_sensitivity(graph, x, loss_fn):
    """Where the INT8 error of `graph` comes from: [(what stays float, loss)] on x, for
    nothing, the weights, all activations, and each quantized activation tensor alone (by
    its ONNX name), the largest recovery (lowest loss) first after the three summary rows.
    loss_fn(logits) -> float, e.g. the KL divergence from the float model's outputs."""
    saved = (set(graph.unquantized), graph.float_weights)
    groups = {}
    for node in graph.qdq.graph.node:
        if node.op_type == 'QuantizeLinear':
            groups.setdefault(node.input[1], []).append(node.input[0])

    def loss():
        with torch.no_grad():
            return float(loss_fn(graph(x)))
    try:
        graph.eval()
        rows = [('nothing (INT8)', loss())]
        graph.float_weights = True
        rows.append(('weights', loss()))
        graph.float_weights, graph.unquantized = False, set(groups)
        rows.append(('activations', loss()))
        single = []
        for scale, tensors in groups.items():
            graph.unquantized = {scale}
            single.append((tensors[0], loss()))
        return rows + sorted(single, key=lambda row: row[1])
    finally:
        graph.unquantized, graph.float_weights = saved


def write_int8(int8, out_path):
    """Write an INT8 ModelProto with compact names (public/quantize.py); its size in bytes."""
    from public.quantize import _compact_names
    model = onnx.ModelProto()
    model.CopyFrom(int8)
    model = _compact_names(model)
    onnx.checker.check_model(model)
    directory = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{out_path}.{os.getpid()}.tmp"
    try:
        onnx.save(model, tmp)
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return os.path.getsize(out_path)


def qat_int8(model, data, lr, settings, epochs, calibration_x, out_path, in_channels,
             input_size, opset, device=torch.device('cpu')):
    """Quantization-aware INT8: fine-tune `model` (a trained float nn.Module, not modified)
    for `epochs` epochs through the INT8 graph onnxruntime runs (lr: the fine-tuning rate;
    1e-4, about a tenth of the training rate, measured best in bench/bench_qat.py), keep the
    epoch whose INT8 file is closest to the float model on validation (epoch 0 = no
    fine-tuning), write that file to out_path (QDQ, int8 weights, compact names, checked)
    and return its size in bytes. Deterministic in settings.SEED."""
    outcome = qat_finetune(model, data, lr, settings, epochs, calibration_x, in_channels,
                           input_size, opset, device)
    return write_int8(outcome.int8, out_path)
