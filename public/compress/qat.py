"""Quantization-aware training (QAT): fine-tune a trained model through the very INT8 graph
onnxruntime will run, then write that INT8 model.

    check_quantizable(model)          # SettingsError naming what QAT cannot quantize, and where
    int8_bytes = qat_int8(model, data, lr, settings, epochs, calibration_x, 'saved.int8.onnx',
                          in_channels=1, input_size=1250, opset=18)

How. The model is exported (public/compress/export.py) and prepared as
public/compress/quantize.py prepares it, and onnxruntime's own static quantizer writes the
INT8 QDQ graph (per-channel int8 weights, uint8 activations, calibrated on
`calibration_x`), as post-training quantization (PTQ) does. `FakeQuantGraph`
(public/compress/qdq_graph.py) then runs *that graph* in PyTorch: each QuantizeLinear /
DequantizeLinear is a fake quantization with the scale and zero point onnxruntime chose
(straight-through gradient), and each int8 weight or int32 bias is its trainable float
weight, quantized every step with onnxruntime's formula. So fine-tuning sees exactly the
quantization the exported file does, wherever onnxruntime put it: BatchNorm kept after
SiLU (AFNet) or folded into the Conv by the pre-processing (SepNet), ReLU removed into the
uint8 range, scales shared by Flatten and Unsqueeze, the logits themselves quantized.
onnxruntime's placement rules are read from its output, not re-implemented. Weights are
int8 in [-127, 127], or [-64, 64] with settings.INT8_REDUCE_RANGE (the default; see
public/compress/quantize.py: on x86 CPUs without VNNI, onnxruntime's kernels saturate full-range
weights, and no fine-tuning of the exact arithmetic can make up for that).

The loss is train_model's (CrossEntropyLoss for class labels, BCEWithLogitsLoss for
multi-hot labels) against the float model's own probabilities (distillation): INT8 should
behave like the float model that was measured and chosen, and fitting the labels again
only drifts from the early-stopped optimum. Activation ranges are onnxruntime's
calibration of the current weights, redone every RECALIBRATE_STEPS steps and after each
epoch. Each epoch's INT8 file is run in onnxruntime on the validation data and the one
with the lowest validation loss (the KL divergence from the float model) is kept. Epoch 0
is the better (on validation) of two files without fine-tuning: public/compress/quantize.py's
(min/max ranges) and one with ranges at the 99.99th percentile (RANGES); fine-tuning starts
from it and keeps its range method. So QAT never returns a file further from the float
model on validation than PTQ's. BatchNorm statistics stay frozen
(inference-mode BatchNorm is what the file computes) and the exported graph has no
Dropout, so fine-tuning runs without it.

Why PTQ loses accuracy on the stage-two AFNet (bench/bench_qat.py, quantization_sensitivity):
the error is in the activations, not the weights (with float weights the INT8 model is as
far from the float model as before; with float activations it is ~0). Every activation is
quantized per tensor to uint8 with public/compress/quantize.py's MinMax ranges, and a few values
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
from torch import nn

from public.compress.qdq_graph import (ATTRIBUTE_RULES, OPS, FakeQuantGraph, node_attributes,
                                       onnx_logits, prepare_float_graph, quantize_qdq)
from public.compress.quantize import write_int8_model
from public.core.errors import SettingsError
from public.train.loop import EarlyStopping, num_classes_of
from public.train.recipe import Augmenter, class_weights

RECALIBRATE_STEPS = 100          # training steps between onnxruntime re-calibrations of the ranges
RANGES = (None, 99.99)           # activation ranges tried: None = min/max of the calibration
                                 # values (public/compress/quantize.py), a number = that percentile

# torch.nn layer types QAT handles. Layers defined outside torch (the project's own blocks)
# are judged by the ONNX operators they export to (OPS below).
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
            _check_operators(prepare_float_graph(model, in_channels, input_size, opset, tmp), model)


def _check_operators(prepared, model):
    for node in prepared.graph.node:
        if node.domain not in ('', 'ai.onnx') or node.op_type not in OPS:
            raise _unsupported(model, node, '', f"supported operators: {', '.join(sorted(OPS))}",
                               ' (post-training INT8 only)')
        for attribute, allowed in ATTRIBUTE_RULES.get(node.op_type, {}).items():
            value = node_attributes(node).get(attribute, allowed[0])
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
        self.num_classes = num_classes_of(teacher, data)
        weights = None
        if not self.multilabel and settings.CLASS_WEIGHTS == 'balanced':
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
    validation loss is fine-tuned (ranges=(None,), epochs=0 writes public/compress/quantize.py's
    file byte for byte)."""
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
        raise SettingsError(f"QAT_EPOCHS must be an int >= 0, got QAT_EPOCHS={epochs!r}")
    if not 0.0 <= label_weight <= 1.0:
        raise SettingsError(f"label_weight must be in [0, 1], got label_weight={label_weight!r}")
    if not ranges or any(r is not None and not 0 < r <= 100 for r in ranges):
        raise SettingsError(f"ranges must hold None or percentiles in (0, 100], got "
                            f"ranges={ranges!r}")
    check_quantizable(model)
    reduce_range = settings.INT8_REDUCE_RANGE
    calibration_x = np.asarray(calibration_x, dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = prepare_float_graph(model, in_channels, input_size, opset, tmp)
    _check_operators(prepared, model)
    teacher = copy.deepcopy(model).to(device).eval().requires_grad_(False)
    objective = _Objective(teacher, data, settings, label_weight, device)
    val_targets = _val_targets(objective, data, device)
    starts = {}
    for percentile in ranges:
        int8 = quantize_qdq(prepared, calibration_x, percentile, reduce_range)
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
    augment = Augmenter(settings.SEED, device, settings.AUGMENT) if settings.AUGMENT else None
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
    """Write an INT8 ModelProto with compact names (public/compress/quantize.py); its size in
    bytes."""
    model = onnx.ModelProto()
    model.CopyFrom(int8)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    return write_int8_model(model, out_path)


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
