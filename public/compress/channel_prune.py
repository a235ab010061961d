"""Channel pruning (structured): whole channels and hidden units removed, so the ONNX file shrinks.

    pruned = prune_model(trained, 0.5, example_input)     # a new, physically smaller model
    size = pruned_size(build, 0.5, in_channels=1, input_size=1250, opset=18)  # exact bytes
    build = copy_builder(pruned)                           # picklable, for TrialSpec.build
    zeroed = unstructured_prune(trained, 0.5)              # for comparison: same file size

`prune_model` removes `fraction` of the output channels of every prunable Conv1d (with the
BatchNorm, depthwise convs, squeeze-excite FCs and next layers' inputs that share them) and
of the hidden units of every hidden Linear, keeping those whose producing weights have the
largest L1 norm. The model's input channels and its outputs (classes) are never touched.
The result is a deep copy of the input model (same class, same forward, same hooks) whose
layers have smaller weight tensors: it trains, exports, and pickles like the original.

How the channels that must be pruned together are found: the model is traced with
torch.fx and run once on `example_input`; each tensor carries which channel group its
channel axis belongs to. A Conv1d (groups=1) or Linear starts a new group (its outputs)
and consumes its input's group; BatchNorm, activations, dropout, pooling, depthwise convs,
mean over time, (un)squeeze keep the group; an element-wise product or sum of two tensors
(squeeze-excite's x * w, a residual) merges their groups; Flatten makes each channel own
`length` consecutive features of the next Linear. Groups reaching the model input or
output are frozen. Anything else in the channel path (torch.cat, chunk, a channel
shuffle's view/transpose, grouped convs, LayerNorm, ...) is a SettingsError naming the
model and the layer or operator: nothing is guessed.

Unstructured pruning (zeroing individual weights) does not shrink the file: ONNX stores
every weight tensor densely, zeros included (tests/test_prune.py and
bench/bench_prune.py measure it).
"""
import copy
import functools
import math
import os
import tempfile
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.nn.utils import prune as torch_prune

from public.compress.export import export_onnx, like_trained
from public.core.errors import SettingsError
from public.models.blocks import to_1d

# Layers that keep the channel group of their input, element by element.
_PASSTHROUGH_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.ELU, nn.Sigmoid,
                        nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Dropout, nn.Identity)
_POOL_MODULES = (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d)
_PASSTHROUGH_OPS = {'relu', 'relu6', 'silu', 'gelu', 'sigmoid', 'tanh', 'hardswish',
                    'hardsigmoid', 'leaky_relu', 'elu', 'mish', 'dropout', 'neg', 'abs', 'exp',
                    'contiguous', 'clone', 'float', 'max_pool1d', 'avg_pool1d',
                    'adaptive_avg_pool1d', 'adaptive_max_pool1d'}
_BINARY_OPS = {'add', 'mul', 'sub', 'truediv', 'div', 'iadd', 'imul', 'isub', 'itruediv'}
_REDUCTIONS = {'mean', 'sum', 'amax', 'amin'}
_RESHAPES = {'view', 'reshape'}
_METADATA = {'size', 'dim'}          # ops that read a shape, not channel values
_SUPPORTED = ("Conv1d (groups 1 or depthwise), BatchNorm1d, Linear, Flatten, activations, "
              "Dropout, 1-d pooling, mean/sum over time, (un)squeeze, view/reshape to "
              "(N, -1), element-wise + - * /")


@dataclass
class _Group:
    """Channels that must be kept or removed together."""
    size: int
    producer: str = ''                            # module whose weights rank the channels
    members: list = field(default_factory=list)   # (module name, role, block)
    frozen: str = ''                              # why it may not be pruned


@dataclass(frozen=True)
class _Channels:
    """Where a tensor's channels are: axis, group, and entries per channel on that axis."""
    group: int
    axis: int
    block: int = 1


def _op_name(target):
    if isinstance(target, str):
        return target
    return getattr(target, '__name__', str(target))


class _ChannelTrace(fx.Interpreter):
    """Runs the traced model once and records each tensor's channel group."""

    def __init__(self, graph_module, model_name):
        super().__init__(graph_module, garbage_collect_values=False)
        self.extra_traceback = False          # our messages name the node already
        self.model_name = model_name
        self.groups, self.parent = [], []
        self.channels = {}                    # node -> _Channels or None
        self.calls = {}                       # parameterised module name -> call count

    # ----------------------------------------------------------------- groups (union-find)
    def _new_group(self, size, producer='', frozen=''):
        self.groups.append(_Group(size, producer, [], frozen))
        self.parent.append(len(self.parent))
        return len(self.groups) - 1

    def find(self, g):
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def _merge(self, a, b, node):
        a, b = sorted((self.find(a), self.find(b)))
        if a == b:
            return a
        ga, gb = self.groups[a], self.groups[b]
        if ga.size != gb.size:
            self._fail(node, f"combines {ga.size} and {gb.size} channels")
        ga.members += gb.members
        ga.frozen = ga.frozen or gb.frozen
        ga.producer = ga.producer or gb.producer      # the earlier producer ranks the channels
        self.parent[b] = a
        return a

    def _member(self, ch, name, role, block=1):
        self.groups[self.find(ch.group)].members.append((name, role, block))

    # ----------------------------------------------------------------- errors
    def _fail(self, node, why):
        what = (f"layer '{node.target}' ({type(self.module.get_submodule(node.target)).__name__})"
                if node.op == 'call_module' else f"operator '{_op_name(node.target)}' (node {node.name})")
        raise SettingsError(f"prune_model: cannot prune {self.model_name}: {what} {why}; "
                            f"public/compress/channel_prune.py supports {_SUPPORTED}")

    # ----------------------------------------------------------------- propagation
    def run_node(self, n):
        result = super().run_node(n)
        self.channels[n] = self._propagate(n, result)
        return result

    def _inputs(self, n):
        """(node, channels) of the node's tensor arguments that carry channels."""
        found = []
        for arg in list(n.args) + list(n.kwargs.values()):
            for a in (arg if isinstance(arg, (list, tuple)) else (arg,)):
                if isinstance(a, fx.Node) and self.channels.get(a) is not None:
                    found.append((a, self.channels[a]))
        return found

    def _shape(self, node):
        return tuple(self.env[node].shape)

    def _propagate(self, n, result):
        if n.op == 'placeholder':
            return _Channels(self._new_group(result.shape[1], frozen='model input'), 1)
        if n.op == 'output':
            for _, ch in self._inputs(n):
                self.groups[self.find(ch.group)].frozen = 'model output'
            return None
        if n.op == 'get_attr':
            self._fail(n, "uses a parameter outside a layer")
        inputs = self._inputs(n)
        if not isinstance(result, torch.Tensor):
            reads_shape = ((n.op == 'call_method' and n.target in _METADATA)
                           or (n.op == 'call_function' and n.target is getattr
                               and n.args[1] in ('shape', 'ndim')))
            if inputs and not reads_shape:
                self._fail(n, "turns channels into a non-tensor value")
            return None
        if not inputs:
            return None
        if n.op == 'call_module':
            return self._module(n, self.module.get_submodule(n.target), inputs, result)
        return self._function(n, _op_name(n.target), inputs, result)

    def _count_call(self, n):
        self.calls[n.target] = self.calls.get(n.target, 0) + 1
        if self.calls[n.target] > 1:
            self._fail(n, "is called more than once (shared weights)")

    def _module(self, n, m, inputs, result):
        (_, ch), = inputs
        if isinstance(m, nn.Conv1d):
            self._count_call(n)
            if ch.axis != 1 or ch.block != 1:
                self._fail(n, "gets a tensor whose axis 1 is not its channels")
            if m.groups == 1:
                self._member(ch, n.target, 'conv_in')
                out = self._new_group(m.out_channels, producer=n.target)
                self.groups[out].members.append((n.target, 'conv_out', 1))
                return _Channels(out, 1)
            if m.groups == m.in_channels == m.out_channels:
                self._member(ch, n.target, 'depthwise')
                return ch
            self._fail(n, f"is a grouped convolution (groups={m.groups}, in {m.in_channels}, "
                          f"out {m.out_channels}); only groups=1 and depthwise are supported")
        if isinstance(m, nn.BatchNorm1d):
            self._count_call(n)
            if ch.axis != 1 or ch.block != 1:
                self._fail(n, "normalises an axis that is not the channels")
            self._member(ch, n.target, 'batchnorm')
            return ch
        if isinstance(m, nn.Linear):
            self._count_call(n)
            if ch.axis != result.dim() - 1:
                self._fail(n, "mixes an axis other than the channels")
            self._member(ch, n.target, 'linear_in', ch.block)
            out = self._new_group(m.out_features, producer=n.target)
            self.groups[out].members.append((n.target, 'linear_out', 1))
            return _Channels(out, result.dim() - 1)
        if isinstance(m, nn.Flatten):
            return self._flatten(n, ch, self._shape(inputs[0][0]), m.start_dim, m.end_dim)
        if isinstance(m, _PASSTHROUGH_MODULES):
            return ch
        if isinstance(m, _POOL_MODULES):
            if ch.axis != 1 or result.dim() != 3:
                self._fail(n, "pools a tensor whose axis 1 is not its channels")
            return ch
        self._fail(n, "is not a supported layer type in the channel path")

    def _function(self, n, name, inputs, result):
        args = n.args
        if name == to_1d.__name__ or name == 'squeeze':
            (a, ch), = inputs
            shape = self._shape(a)
            dim = -1 if name == to_1d.__name__ else (args[1] if len(args) > 1 else n.kwargs.get('dim'))
            if dim is None or isinstance(dim, (tuple, list)):
                self._fail(n, "squeezes without one explicit dim")
            dim %= len(shape)
            if dim == ch.axis:
                self._fail(n, "squeezes the channel axis")
            return _Channels(ch.group, ch.axis - (dim < ch.axis and shape[dim] == 1), ch.block)
        if name == 'unsqueeze':
            (_, ch), = inputs
            dim = (args[1] if len(args) > 1 else n.kwargs['dim']) % result.dim()
            return _Channels(ch.group, ch.axis + (dim <= ch.axis), ch.block)
        if name == 'flatten':
            (a, ch), = inputs
            start = args[1] if len(args) > 1 else n.kwargs.get('start_dim', 0)
            end = args[2] if len(args) > 2 else n.kwargs.get('end_dim', -1)
            return self._flatten(n, ch, self._shape(a), start, end)
        if name in _RESHAPES:
            (a, ch), = inputs
            return self._reshape(n, ch, self._shape(a), tuple(result.shape))
        if name in _REDUCTIONS:
            (a, ch), = inputs
            rank = len(self._shape(a))
            dim = args[1] if len(args) > 1 else n.kwargs.get('dim')
            keepdim = args[2] if len(args) > 2 else n.kwargs.get('keepdim', False)
            dims = {d % rank for d in (dim if isinstance(dim, (tuple, list)) else (dim,))} \
                if dim is not None else set(range(rank))
            if ch.axis in dims:
                self._fail(n, "reduces over the channel axis")
            return _Channels(ch.group, ch.axis - (0 if keepdim else sum(d < ch.axis for d in dims)),
                             ch.block)
        if name in _PASSTHROUGH_OPS:
            (_, ch), = inputs
            return ch
        if name in _BINARY_OPS:
            return self._binary(n, inputs, result)
        self._fail(n, "is not supported in the channel path")

    def _flatten(self, n, ch, shape, start, end):
        start, end = start % len(shape), end % len(shape)
        if ch.axis < start:
            return ch
        if ch.axis > end:
            return _Channels(ch.group, ch.axis - (end - start), ch.block)
        if ch.axis != start:
            self._fail(n, "flattens axes before the channel axis into it")
        return _Channels(ch.group, start, ch.block * math.prod(shape[ch.axis + 1:end + 1]))

    def _reshape(self, n, ch, shape, out):
        """Only a reshape that merges the channel axis with the axes after it (a flatten)."""
        a = ch.axis
        if len(out) > a and out[:a] == shape[:a]:
            for k in range(a + 1, len(shape) + 1):
                if out[a] == math.prod(shape[a:k]) and out[a + 1:] == shape[k:]:
                    return _Channels(ch.group, a, ch.block * math.prod(shape[a + 1:k]))
        self._fail(n, f"reshapes {shape} to {out}, which splits or moves the channel axis")

    def _binary(self, n, inputs, result):
        rank = result.dim()
        first = None
        for a, ch in inputs:
            shape = self._shape(a)
            from_right = len(shape) - ch.axis
            axis = rank - from_right
            if shape[ch.axis] != result.shape[axis]:
                self._fail(n, "broadcasts a tensor over the channel axis")
            if first is None:
                first, group = (axis, ch.block), ch.group
            elif (axis, ch.block) != first:
                self._fail(n, "combines tensors whose channels lie on different axes")
            else:
                group = self._merge(group, ch.group, n)
        for arg in n.args:
            if isinstance(arg, fx.Node) and self.channels.get(arg) is None \
                    and isinstance(self.env[arg], torch.Tensor):
                self._fail(n, f"combines the channels with a tensor of unknown layout ({arg.name})")
        return _Channels(group, first[0], first[1])


def _validate_fraction(fraction):
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
            or not 0 <= fraction < 1:
        raise SettingsError(f"prune_model: fraction must be a number in the range [0, 1), "
                            f"got fraction={fraction!r}")


def kept_units(size, fraction):
    """Channels/units kept of `size` when `fraction` is pruned: floor(fraction * size) go,
    at least one stays. Depends only on the size, so the pruned shapes are known up front."""
    return max(1, size - int(fraction * size + 1e-9))


def _trace(model, example_input):
    """The channel groups of `model` (traced and run once, in eval mode, without gradients)."""
    name = type(model).__name__
    try:
        graph = fx.Tracer(autowrap_functions=(to_1d,)).trace(model)
    except Exception as exc:
        raise SettingsError(f"prune_model: cannot prune {name}: torch.fx cannot trace its "
                            f"forward ({type(exc).__name__}: {exc})") from exc
    traced = fx.GraphModule(model, graph)
    tracer = _ChannelTrace(traced, name)
    with torch.no_grad():
        tracer.run(example_input)
    return tracer


def _importance(module):
    """L1 norm of each output channel's / unit's weights."""
    return module.weight.detach().abs().flatten(1).sum(1)


def _set_param(module, name, keep, dim):
    old = getattr(module, name)
    if old is None:
        return
    new = old.detach().index_select(dim, keep.to(old.device)).clone()
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        setattr(module, name, new)          # a registered buffer keeps its registration


def _apply(module, role, keep, block):
    k = len(keep)
    if role == 'conv_out':
        _set_param(module, 'weight', keep, 0)
        _set_param(module, 'bias', keep, 0)
        module.out_channels = k
    elif role == 'conv_in':
        _set_param(module, 'weight', keep, 1)
        module.in_channels = k
    elif role == 'depthwise':
        _set_param(module, 'weight', keep, 0)
        _set_param(module, 'bias', keep, 0)
        module.in_channels = module.out_channels = module.groups = k
    elif role == 'batchnorm':
        for name in ('weight', 'bias', 'running_mean', 'running_var'):
            _set_param(module, name, keep, 0)
        module.num_features = k
    elif role == 'linear_out':
        _set_param(module, 'weight', keep, 0)
        _set_param(module, 'bias', keep, 0)
        module.out_features = k
    elif role == 'linear_in':
        columns = (keep[:, None] * block + torch.arange(block)).flatten()
        _set_param(module, 'weight', columns, 1)
        module.in_features = k * block


def prune_model(model, fraction, example_input):
    """A new model with `fraction` of each prunable channel group removed (lowest L1 first).

    model: an nn.Module taking example_input; it is not modified. fraction: in [0, 1);
    each group of n channels keeps kept_units(n, fraction). Returns a deep copy of the
    model (same class and training mode) with physically smaller layers. Raises
    SettingsError naming the model and the layer/operator it cannot prune."""
    _validate_fraction(fraction)
    pruned = copy.deepcopy(model)
    was_training = pruned.training
    pruned.eval()
    with torch.no_grad():
        expected = tuple(pruned(example_input).shape)
    tracer = _trace(pruned, example_input)
    modules = dict(pruned.named_modules())
    for g in {tracer.find(i) for i in range(len(tracer.groups))}:
        group = tracer.groups[g]
        if group.frozen or not group.producer:
            continue
        k = kept_units(group.size, fraction)
        if k == group.size:
            continue
        keep = torch.topk(_importance(modules[group.producer]), k).indices.sort().values.cpu()
        for name, role, block in group.members:
            _apply(modules[name], role, keep, block)
    with torch.no_grad():
        got = tuple(pruned(example_input).shape)
    if got != expected:
        raise RuntimeError(f"prune_model: {type(model).__name__} gives output {got} after "
                           f"pruning, {expected} before (a bug in public/compress/channel_prune.py)")
    return pruned.train(was_training)


def pruned_probe(build, fraction, in_channels, input_size):
    """build()'s model with distinct random values in every tensor, pruned by `fraction`
    (eval mode): exported, it has the exact file size of the trained pruned model.

    The exporter stores identical initializers once, so an untrained model (BatchNorm all
    ones / zeros) would export smaller; public.compress.export.like_trained gives the values.
    For QUANTIZE_INT8, quantize this probe's export as plan_candidates does."""
    probe = like_trained(build()).eval()
    example = torch.zeros(2, in_channels, input_size, 1)
    return like_trained(prune_model(probe, fraction, example), seed=1).eval()


def pruned_size(build, fraction, in_channels, input_size, opset):
    """Exact ONNX size in bytes of build()'s model pruned by `fraction`, before any training.

    build: zero-arg callable giving a fresh model, as it is exported (with
    add_normalization when NORMALIZE='segment'). Pruning keeps kept_units(n, fraction) of
    each group whichever channels they are, so the probe (pruned_probe) and a pruned
    trained model have the same tensor shapes and, with distinct values, the same size."""
    probe = pruned_probe(build, fraction, in_channels, input_size)
    with tempfile.TemporaryDirectory(prefix='atml-prune-') as folder:
        return export_onnx(probe, os.path.join(folder, 'probe.onnx'), in_channels,
                           input_size, opset)


def unstructured_prune(model, fraction):
    """A copy of model with `fraction` of each Conv1d/Linear weight zeroed (smallest |w|,
    torch.nn.utils.prune.l1_unstructured, made permanent). Same shapes, same ONNX size:
    kept only to show that zeroed weights do not shrink the file."""
    _validate_fraction(fraction)
    zeroed = copy.deepcopy(model)
    for module in zeroed.modules():
        if isinstance(module, (nn.Conv1d, nn.Linear)):
            torch_prune.l1_unstructured(module, 'weight', amount=fraction)
            torch_prune.remove(module, 'weight')
    return zeroed


def copy_builder(model):
    """A picklable zero-arg build() returning a fresh copy of `model` (for TrialSpec.build:
    run_trial then fine-tunes the pruned weights instead of a fresh initialisation)."""
    return functools.partial(copy.deepcopy, model)


__all__ = ['prune_model', 'pruned_size', 'pruned_probe', 'kept_units', 'unstructured_prune',
           'copy_builder']
