"""Deployment figures of an exported ONNX model, read from the file alone (issue 18).

    stats = graph_stats('saved.onnx')            # or an onnx.ModelProto
    format_stats(stats)   # '11.2 k MACs, 0.20 KB params, peak activations 9.74 KB (INT8 2.44 KB)'

Every figure is per segment: the input's symbolic batch dimension is set to 1 (pass
`input_shape`, the full shape batch included, for other symbolic dimensions). The same
function reads float files and INT8 files in QDQ format (onnxruntime's quantize_static).

macs                        multiply-accumulates of one inference (batch 1) by the
                            multiply-accumulate ops only: Conv, ConvTranspose, Gemm, MatMul
                            and their quantized forms ConvInteger, QLinearConv, MatMulInteger,
                            QLinearMatMul. Conv: output elements x (Cin/groups) x kernel
                            elements; ConvTranspose: input elements x (Cout/groups) x kernel
                            elements; Gemm / MatMul: M x K x N, batch dims multiplied. Bias
                            additions, BatchNormalization, pooling (GlobalAveragePool,
                            ReduceMean, MaxPool...), activations and element-wise ops
                            (Add, Mul...) count 0. In a QDQ file the float Conv/Gemm between
                            DequantizeLinear and QuantizeLinear is counted, so an INT8 file
                            has the MACs of its float model; so does a QOperator file
                            (QLinearConv, onnxruntime's com.microsoft QGemm) or a dynamic
                            one (ConvInteger, MatMulInteger). onnxruntime's FusedConv /
                            FusedGemm count as Conv / Gemm; other ops of other domains, and
                            ops inside control-flow subgraphs (If/Loop/Scan), count 0.
param_bytes                 bytes of every constant stored in the file: all initializers and
                            Constant nodes' tensors, each elements x its element size (float32
                            4, int8/uint8 1, int32 4, int64 8, 4-bit types packed 2 a byte),
                            quantization scales / zero points and shape constants included.
params                      elements of the constants that are weights or biases: those that
                            reach a weight/bias input of a layer op (Conv, ConvTranspose,
                            Gemm, MatMul, BatchNormalization's scale, bias, mean and
                            variance, other normalizations' scale/bias, PRelu's slope,
                            RNN/LSTM/GRU, the quantized forms) or that an Add adds (a bias
                            after a MatMul or ConvInteger; only constants of 2+ elements),
                            followed back through the DequantizeLinear / Reshape /
                            Transpose / Cast... that prepare them. Not counted:
                            quantization scales and zero points, Mul / Sub / Div constants,
                            int64 / bool (shape, axes) constants. An INT8 file has the
                            params of its float model.
peak_activation_bytes       the largest total size of the activations alive at once when the
                            nodes run in the file's order (ONNX stores nodes topologically
                            sorted; an unsorted file is sorted first). A tensor is alive from
                            the step of the node that produces it (graph inputs: from the
                            start) through the step of its last consumer; graph outputs stay
                            alive to the end; an output nothing reads is alive during its own
                            step. During a node's step its inputs and outputs are all alive.
                            Sizes are elements x element size of the tensor's ONNX type.
                            Activations are graph inputs and node outputs, not constants:
                            initializers, Constant nodes and tensors computed from constants
                            only (e.g. the DequantizeLinear of a QDQ weight, which a runtime
                            folds or fuses into the consuming op) are excluded.
peak_activation_bytes_int8  the same peak with every activation stored as 1 byte per element,
                            as on an INT8 runtime: for a float model, the peak in elements.
                            In a QDQ file a QuantizeLinear's float input (when only
                            QuantizeLinear nodes read it and it is no graph output) and a
                            DequantizeLinear's float output are counted as one stored tensor
                            with the quantized tensor they come from / go to (a fused integer
                            kernel never materialises them): QDQ pairs add no copies, and a
                            QDQ file reports about what its float model's figure is (less
                            where the quantizer dropped nodes, e.g. a Relu after a Conv).

Shapes come from onnx.shape_inference.infer_shapes (with data propagation) on a copy whose
inputs have the batch dimension fixed to 1. Where inference leaves a needed shape unknown (an
op it does not know, such as onnxruntime's com.microsoft contrib ops, or a data-dependent
shape), the model runs once in onnxruntime (graph optimisations off) on a zeros input with
every intermediate tensor exposed as an output, and their shapes are read from that run; a
data-dependent shape is then the one of the zeros input. String tensors count 0 bytes.

Self-contained on purpose (onnx, numpy, onnxruntime only): it reads any exported file.
"""
import math
import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

__all__ = ['graph_stats', 'format_stats']

# Ops whose outputs are never constant even when all their inputs are.
_NONDETERMINISTIC = {'RandomNormal', 'RandomUniform', 'RandomNormalLike', 'RandomUniformLike',
                     'Multinomial', 'Bernoulli'}

# Weight / bias inputs (by position) of the layer ops: what `params` counts.
_WEIGHT_INPUTS = {
    'Conv': (1, 2), 'ConvTranspose': (1, 2), 'ConvInteger': (1,), 'QLinearConv': (3, 8),
    'Gemm': (0, 1, 2), 'MatMul': (0, 1), 'MatMulInteger': (0, 1), 'QLinearMatMul': (0, 3),
    'BatchNormalization': (1, 2, 3, 4), 'InstanceNormalization': (1, 2),
    'LayerNormalization': (1, 2), 'GroupNormalization': (1, 2), 'PRelu': (1,),
    'RNN': (1, 2, 3), 'LSTM': (1, 2, 3, 7), 'GRU': (1, 2, 3),
    'FusedConv': (1, 2), 'FusedGemm': (0, 1, 2), 'QGemm': (0, 3, 6),    # com.microsoft
}

# When tracing a weight back to the stored constant, only these inputs carry its values
# (the others are scales, zero points, shapes, axes...). Ops not listed: all inputs.
_DATA_INPUTS = {
    'DequantizeLinear': (0,), 'QuantizeLinear': (0,), 'Reshape': (0,), 'Squeeze': (0,),
    'Unsqueeze': (0,), 'Expand': (0,), 'Tile': (0,), 'Slice': (0,), 'Pad': (0,),
    'Resize': (0,), 'Clip': (0,), 'Split': (0,), 'Gather': (0,),
}

_SUB_BYTE_BITS = {getattr(TensorProto, name): bits for name, bits in
                  (('INT4', 4), ('UINT4', 4), ('FLOAT4E2M1', 4), ('INT2', 2), ('UINT2', 2),
                   ('FLOAT6E2M3', 6), ('FLOAT6E3M2', 6))
                  if hasattr(TensorProto, name)}


def _nbytes(elem_type, numel):
    """Bytes of numel elements of ONNX element type elem_type, as stored (packed sub-byte)."""
    if elem_type in _SUB_BYTE_BITS:
        return math.ceil(numel * _SUB_BYTE_BITS[elem_type] / 8)
    if elem_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return 0
    return numel * helper.tensor_dtype_to_np_dtype(elem_type).itemsize


def _constant_tensors(node):
    """[(elem_type, dims, n_string_bytes)] of a Constant node's stored value."""
    out = []
    for attr in node.attribute:
        if attr.name == 'value':
            out.append((attr.t.data_type, tuple(attr.t.dims), sum(map(len, attr.t.string_data))))
        elif attr.name == 'sparse_value':
            for t in (attr.sparse_tensor.values, attr.sparse_tensor.indices):
                out.append((t.data_type, tuple(t.dims), 0))
        elif attr.name == 'value_float':
            out.append((TensorProto.FLOAT, (), 0))
        elif attr.name == 'value_floats':
            out.append((TensorProto.FLOAT, (len(attr.floats),), 0))
        elif attr.name == 'value_int':
            out.append((TensorProto.INT64, (), 0))
        elif attr.name == 'value_ints':
            out.append((TensorProto.INT64, (len(attr.ints),), 0))
        elif attr.name == 'value_string':
            out.append((TensorProto.STRING, (), len(attr.s)))
        elif attr.name == 'value_strings':
            out.append((TensorProto.STRING, (len(attr.strings),), sum(map(len, attr.strings))))
    return out


def _subgraph_inputs(graph):
    """Names a (control-flow) subgraph reads from the enclosing scopes."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    used = set()
    for node in graph.node:
        used.update(n for n in _node_inputs(node) if n not in defined)
        defined.update(node.output)
    used.update(v.name for v in graph.output if v.name not in defined)
    return used


def _node_inputs(node):
    """Explicit inputs of node plus the outer names its subgraph attributes read."""
    names = [n for n in node.input if n]
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            names.extend(sorted(_subgraph_inputs(g)))
    return names


def _topological(graph, available):
    """graph.node in a topological order: the stored one if valid, else a stable sort."""
    nodes = list(graph.node)
    known = set(available)
    for node in nodes:
        if any(n not in known for n in _node_inputs(node)):
            break
        known.update(node.output)
    else:
        return nodes
    producers = {o: i for i, node in enumerate(nodes) for o in node.output if o}
    done, order, known = set(), [], set(available)
    while len(order) < len(nodes):
        progressed = False
        for i, node in enumerate(nodes):
            if i not in done and all(n in known or n not in producers
                                     for n in _node_inputs(node)):
                done.add(i)
                order.append(node)
                known.update(node.output)
                progressed = True
                break
        if not progressed:
            raise ValueError("the graph has a cycle: its nodes cannot be ordered")
    return order


def _fixed_inputs(activation_inputs, input_shape):
    """{input name: fixed shape tuple}: the batch dim (dim 0) 1 unless input_shape says."""
    if input_shape is not None and not isinstance(input_shape, dict):
        if len(activation_inputs) != 1:
            raise ValueError(f"the model has {len(activation_inputs)} inputs: pass "
                             f"input_shape as {{name: shape}}")
        input_shape = {activation_inputs[0].name: input_shape}
    input_shape = dict(input_shape or {})
    unknown = set(input_shape) - {v.name for v in activation_inputs}
    if unknown:
        raise ValueError(f"input_shape names no input of the model: {sorted(unknown)}")
    shapes = {}
    for value in activation_inputs:
        if value.name in input_shape:
            shapes[value.name] = tuple(int(d) for d in input_shape[value.name])
            continue
        dims = []
        for i, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField('dim_value'):
                dims.append(dim.dim_value)
            elif i == 0:
                dims.append(1)
            else:
                raise ValueError(f"input {value.name!r} has the symbolic dimension "
                                 f"{dim.dim_param or '?'!r} at position {i}: pass input_shape")
        shapes[value.name] = tuple(dims)
    return shapes


def _with_fixed_inputs(model, fixed):
    """A copy of model: inputs of the fixed shapes, output shapes and value_info cleared."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    for value in graph.input:
        if value.name in fixed:
            shape = value.type.tensor_type.shape
            del shape.dim[:]
            for d in fixed[value.name]:
                shape.dim.add().dim_value = d
    for value in graph.output:
        value.type.tensor_type.ClearField('shape')
    del graph.value_info[:]
    return model


def _inferred(model):
    """{name: (elem_type, shape tuple or None)} after onnx shape inference (None: unknown)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:   # noqa: BLE001  (inference is best effort; onnxruntime fills the gaps)
        inferred = model
    out = {}
    graph = inferred.graph
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        tensor_type = value.type.tensor_type
        shape = None
        if tensor_type.HasField('shape') and all(d.HasField('dim_value')
                                                 for d in tensor_type.shape.dim):
            shape = tuple(d.dim_value for d in tensor_type.shape.dim)
        out[value.name] = (tensor_type.elem_type, shape)
    return out


def _run_shapes(model, fixed, names):
    """{name: (elem_type or None, shape)} of node outputs `names`, from one onnxruntime run
    on zeros inputs of the fixed shapes with those tensors exposed as graph outputs."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    present = {v.name for v in graph.output}
    for name in names:
        if name not in present:
            graph.output.add().name = name
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=['CPUExecutionProvider'])
    types = {v.name: v.type.tensor_type.elem_type for v in graph.input}
    feed = {name: np.zeros(shape, helper.tensor_dtype_to_np_dtype(types[name]))
            for name, shape in fixed.items()}
    wanted = [o.name for o in session.get_outputs() if o.name in set(names)]
    results = session.run(wanted, feed)
    return {name: (helper.np_dtype_to_tensor_dtype(np.asarray(r).dtype), np.shape(r))
            for name, r in zip(wanted, results)}


class _Peak:
    """Peak of the sum of sizes of storage groups over the steps they are alive."""

    def __init__(self, steps):
        self.delta = [0] * (steps + 2)

    def add(self, size, first, last):
        self.delta[first] += size
        self.delta[last + 1] -= size

    def value(self):
        best = running = 0
        for d in self.delta:
            running += d
            best = max(best, running)
        return best


def graph_stats(path_or_model, input_shape=None):
    """Deployment figures of an ONNX model (a path or an onnx.ModelProto), batch 1.

    Returns {'macs', 'param_bytes', 'params', 'peak_activation_bytes',
    'peak_activation_bytes_int8'} (ints; the module docstring defines each).
    input_shape: the full shape (batch included) of the single input, or {name: shape} for
    several; by default each input's shape from the file with dim 0 set to 1 when symbolic
    (a symbolic dimension elsewhere then needs input_shape)."""
    if isinstance(path_or_model, onnx.ModelProto):
        model = path_or_model
    elif isinstance(path_or_model, (str, os.PathLike)):
        model = onnx.load(path_or_model)
    else:
        raise TypeError(f"graph_stats takes a path or an onnx.ModelProto, "
                        f"not {type(path_or_model).__name__}")
    graph = model.graph

    # ---- constants: initializers, Constant nodes and what is computed from them only
    stored = {}     # name -> (elem_type, dims, string bytes)
    for t in graph.initializer:
        stored[t.name] = (t.data_type, tuple(t.dims), sum(map(len, t.string_data)))
    for t in graph.sparse_initializer:
        stored[t.values.name] = (t.values.data_type, tuple(t.dims), 0)
    param_bytes = sum(_nbytes(e, int(np.prod(d, dtype=np.int64))) + s
                      for e, d, s in stored.values())
    for t in graph.sparse_initializer:      # its indices are stored too
        param_bytes += _nbytes(t.indices.data_type, int(np.prod(t.indices.dims, dtype=np.int64)))
    for node in graph.node:
        if node.op_type == 'Constant' and node.domain in ('', 'ai.onnx'):
            parts = _constant_tensors(node)
            param_bytes += sum(_nbytes(e, int(np.prod(d, dtype=np.int64))) + s
                               for e, d, s in parts)
            if node.output and parts:
                stored[node.output[0]] = parts[0]

    activation_inputs = [v for v in graph.input if v.name not in stored]
    nodes = _topological(graph, [v.name for v in graph.input] + list(stored))
    constant = set(stored)
    producer = {}
    for node in nodes:
        inputs = _node_inputs(node)
        is_constant = (node.op_type == 'Constant' or
                       (inputs and node.op_type not in _NONDETERMINISTIC
                        and all(n in constant for n in inputs)))
        for o in node.output:
            if o:
                producer[o] = node
                if is_constant:
                    constant.add(o)

    # ---- params: constants that reach a weight/bias input, traced back to what is stored
    def trace(name, found):
        """Add to found the stored constants whose values make up constant tensor name."""
        if name in found or name not in constant:
            return found
        if name in stored:
            found.add(name)
            return found
        node = producer[name]
        slots = _DATA_INPUTS.get(node.op_type)
        inputs = list(node.input) if slots is None else [node.input[i] for i in slots
                                                          if i < len(node.input)]
        for n in inputs:
            if n:
                trace(n, found)
        return found
    weights = set()
    for node in nodes:
        for i in _WEIGHT_INPUTS.get(node.op_type, ()):
            if i < len(node.input) and node.input[i]:
                trace(node.input[i], weights)
        if node.op_type == 'Add':       # a bias added after a MatMul / ConvInteger...
            for n in node.input:
                sources = trace(n, set())
                if sum(int(np.prod(stored[s][1], dtype=np.int64)) for s in sources) > 1:
                    weights |= sources
    params = sum(int(np.prod(stored[n][1], dtype=np.int64)) for n in weights
                 if stored[n][0] not in (TensorProto.INT64, TensorProto.BOOL,
                                         TensorProto.STRING))

    # ---- shapes at batch 1
    fixed = _fixed_inputs(activation_inputs, input_shape)
    fixed_model = _with_fixed_inputs(model, fixed)
    info = _inferred(fixed_model)
    for name, shape in fixed.items():
        info[name] = (info.get(name, (0, None))[0], shape)
    for name, (elem_type, dims, _) in stored.items():
        info[name] = (elem_type, dims)
    activations = [v.name for v in activation_inputs]
    activations += [o for node in nodes for o in node.output if o and o not in constant]
    mac_nodes = [node for node in nodes if _mac_op(node)]
    needed = set(activations) | {n for node in mac_nodes
                                 for n in list(node.input) + list(node.output) if n}
    missing = sorted(n for n in needed
                     if info.get(n, (0, None))[1] is None or not info[n][0])
    if missing:
        try:
            ran = _run_shapes(fixed_model, fixed, missing)
        except Exception as exc:
            raise ValueError(f"shape inference left {len(missing)} tensor shapes unknown "
                             f"(e.g. {missing[:3]}) and onnxruntime could not run the model "
                             f"to find them: {exc}") from exc
        for name, (elem_type, shape) in ran.items():
            known_type = info.get(name, (0, None))[0]
            info[name] = (known_type or elem_type, tuple(shape))
        still = [n for n in missing if info.get(n, (0, None))[1] is None]
        if still:
            raise ValueError(f"shapes of {still[:5]} unknown after inference and a run")

    def numel(name):
        return int(np.prod(info[name][1], dtype=np.int64))

    # ---- MACs
    macs = sum(_mac_op(node)(node, lambda n: info[n][1]) for node in mac_nodes)

    # ---- liveness
    steps = len(nodes)
    first, last = {}, {}
    for name in activations:
        first[name] = last[name] = 0
    for step, node in enumerate(nodes):
        for n in _node_inputs(node):
            if n in first:
                last[n] = step
        for o in node.output:
            if o and o not in constant:
                first[o] = last[o] = step
    outputs = {v.name for v in graph.output}
    for name in outputs & set(first):
        last[name] = max(steps - 1, 0)

    peak = _Peak(max(steps, 1))
    for name in first:
        peak.add(_nbytes(info[name][0], numel(name)), first[name], last[name])

    # INT8: 1 byte per element; QDQ re-labellings share storage (union-find groups).
    parent = {name: name for name in first}

    def root(name):
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name
    consumers = {}
    for node in nodes:
        for n in node.input:
            consumers.setdefault(n, []).append(node)
    for node in nodes:
        if (node.domain not in ('', 'ai.onnx', 'com.microsoft') or not node.input
                or not node.output):
            continue
        src, dst = node.input[0], node.output[0]
        if src not in parent or dst not in parent:
            continue
        if node.op_type == 'DequantizeLinear':
            parent[root(dst)] = root(src)
        elif (node.op_type == 'QuantizeLinear' and src not in outputs
              and all(c.op_type == 'QuantizeLinear' for c in consumers.get(src, []))):
            parent[root(src)] = root(dst)
    groups = {}
    for name in first:
        r = root(name)
        size, lo, hi = groups.get(r, (0, steps, -1))
        groups[r] = (max(size, numel(name)), min(lo, first[name]), max(hi, last[name]))
    peak8 = _Peak(max(steps, 1))
    for size, lo, hi in groups.values():
        peak8.add(size, lo, hi)

    return {'macs': int(macs), 'param_bytes': int(param_bytes), 'params': int(params),
            'peak_activation_bytes': int(peak.value()),
            'peak_activation_bytes_int8': int(peak8.value())}


# ----------------------------------------------------------------------------- MACs by op

def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _prod(dims):
    return int(np.prod(dims, dtype=np.int64))


def _conv_macs(w):
    # Y elements x (Cin/groups) x kernel elements; W is (Cout, Cin/groups, k1, k2, ...).
    return lambda node, shape: _prod(shape(node.output[0])) * _prod(shape(node.input[w])[1:])


def _conv_transpose_macs(node, shape):
    # Each input element meets (Cout/groups) x kernel weights; W is (Cin, Cout/groups, k...).
    return _prod(shape(node.input[0])) * _prod(shape(node.input[1])[1:])


def _gemm_macs(node, shape):
    a = shape(node.input[0])
    k = a[0] if _attr(node, 'transA', 0) else a[-1]
    return _prod(shape(node.output[0])) * k


def _matmul_macs(a_index):
    # Y (batch..., M, N) elements x K, K the last dim of A (its only dim when A is 1-D).
    return lambda node, shape: _prod(shape(node.output[0])) * shape(node.input[a_index])[-1]


_MAC_OPS = {
    ('', 'Conv'): _conv_macs(1), ('', 'ConvInteger'): _conv_macs(1),
    ('', 'QLinearConv'): _conv_macs(3), ('', 'ConvTranspose'): _conv_transpose_macs,
    ('', 'Gemm'): _gemm_macs, ('', 'MatMul'): _matmul_macs(0),
    ('', 'MatMulInteger'): _matmul_macs(0), ('', 'QLinearMatMul'): _matmul_macs(0),
    # onnxruntime's contrib forms: QOperator INT8 files (QGemm), optimised files (Fused*).
    ('com.microsoft', 'QGemm'): _gemm_macs, ('com.microsoft', 'FusedConv'): _conv_macs(1),
    ('com.microsoft', 'FusedGemm'): _gemm_macs,
}


def _mac_op(node):
    """The MAC count function of node's op, None for ops that count 0."""
    domain = '' if node.domain == 'ai.onnx' else node.domain
    return _MAC_OPS.get((domain, node.op_type))


# ----------------------------------------------------------------------------- formatting

def _count(n):
    """n to 3 significant digits with k / M / G: 950, 11.2 k, 463 k, 1.00 M, 1.56 M."""
    if n < 999.5:
        return f"{int(round(n))}"
    for unit, scale in (('G', 1e9), ('M', 1e6), ('k', 1e3)):
        value = float(f"{n / scale:.3g}")
        if value >= 1:
            digits = max(0, 2 - int(math.floor(math.log10(value))))
            return f"{value:.{digits}f} {unit}"


def _size(n):
    if n >= 1024 * 1024:
        return f"{n / (1024 * 1024):.2f} MB"
    return f"{n / 1024:.2f} KB"


def format_stats(stats):
    """One line: '12.3 k MACs, 4.52 KB params, peak activations 9.77 KB (INT8 2.44 KB)'.

    MACs to 3 significant digits (k = 1e3, M = 1e6, G = 1e9); 'params' is param_bytes and
    sizes are in KB = 1024 bytes (MB = 1024 KB from 1 MB on), two decimals; the INT8 figure
    is peak_activation_bytes_int8."""
    return (f"{_count(stats['macs'])} MACs, {_size(stats['param_bytes'])} params, "
            f"peak activations {_size(stats['peak_activation_bytes'])} "
            f"(INT8 {_size(stats['peak_activation_bytes_int8'])})")
