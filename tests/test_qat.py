"""Tests of public/compress/qat.py: quantization-aware training writes an INT8 file that onnxruntime
runs, that the fake-quantized PyTorch graph predicts exactly, reproducibly, without touching
the float model; what QAT cannot quantize is named before any work.

Models are the stage-two AFNet at c1-f1 (a few training steps so BatchNorm statistics are
real) and small stand-ins; data is the small real data set of conftest (`prepared`).
"""
import copy
import os

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from conftest import PARAMS, load_ss_model, settings_values
import public.compress.qat as qat
import public.compress.qdq_graph as qdq_graph
from public.core.settings import load_settings
from public.core.errors import SettingsError
from public.compress.export import export_onnx, onnx_predict

ss_model = load_ss_model()      # the AFNet scaling of examples/ss_model_afnet.py: these tests'
                                # expectations (PTQ losses, what QAT recovers) were set on it
from public.compress.quantize import quantize_int8
from public.train.recipe import add_normalization
from public.models.small import SepNet
from public.data.prepare import TrialData

OPSET = 18


@pytest.fixture(scope='module')
def settings(small_data, tmp_path_factory):
    values = settings_values(tmp_path_factory.mktemp('qat'), small_data, AUGMENT=True)
    return load_settings([f"{k}={v!r}" for k, v in values.items()], params_path=str(PARAMS))


def _warmed(build, x, steps=3, seed=0):
    """build() after a few optimizer steps on x: real BatchNorm statistics, no tensor left
    equal to another (as in any trained model). Seeded: the same model every run."""
    torch.manual_seed(seed)
    model = build()
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    y = torch.arange(len(x)) % 2
    for _ in range(steps):
        model.train()
        optimizer.zero_grad()
        F.cross_entropy(model(x.unsqueeze(-1))[:, :2], y).backward()
        optimizer.step()
    return model.eval()


def _afnet(prepared, num_classes=2):
    config = ss_model.generate_config(1, 1, 1250, num_classes=num_classes)
    return _warmed(lambda: ss_model.AFNet(config), prepared.trial.x_train)


@pytest.fixture(scope='module')
def calibration(prepared):
    return prepared.trial.x_train[:32].numpy()


@pytest.fixture(scope='module')
def outcome(prepared, settings, calibration):
    """One fine-tuning of c1-f1 (2 epochs), shared by the tests that only read it."""
    return qat.qat_finetune(_afnet(prepared), prepared.trial, 1e-3, settings, 2, calibration,
                            1, 1250, OPSET)


def _all_segments(prepared):
    return np.concatenate([prepared.trial.x_train.numpy(), prepared.trial.x_val.numpy(),
                           np.asarray(prepared.x_test)])


def _unfused_logits(int8, x):
    """onnxruntime running the file's QDQ graph node by node (graph optimisations off): each
    QuantizeLinear / DequantizeLinear and float Conv/Gemm as written, no fused integer
    kernels, so the same result on every CPU."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(int8.SerializeToString(), options,
                                   providers=['CPUExecutionProvider'])
    name = session.get_inputs()[0].name
    return session.run(None, {name: np.asarray(x, dtype=np.float32)[..., None]})[0]


def _weight_qmax(int8):
    """The largest |int8 weight| of the file's weighted nodes (<= 64 with reduce_range)."""
    weights = [numpy_helper.to_array(t) for t in int8.graph.initializer
               if t.data_type == onnx.TensorProto.INT8]
    return max(int(np.abs(w.astype(np.int32)).max()) for w in weights)


def _assert_same_as_onnxruntime(got, expected, int8, x):
    """PyTorch's fake-quantized graph computes what the INT8 file says: equal to onnxruntime
    running the QDQ graph as written, on every CPU. With 7-bit weights (INT8_REDUCE_RANGE,
    the default) onnxruntime's fused integer kernels (what ATML measures and deploys) equal it
    too. With full 8-bit weights they do on CPUs with VNNI / AVX-512, but on AVX2-only x86
    CPUs the u8s8 kernels (VPMADDUBSW) saturate 16-bit pair sums (measured on an AVX2-only
    EPYC: up to 2 output steps in these tests, logits off by up to 7.6 on trained models)."""
    np.testing.assert_allclose(got, _unfused_logits(int8, x), atol=1e-4)
    if _weight_qmax(int8) <= 64:
        np.testing.assert_allclose(got, expected, atol=1e-4)
    else:
        assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.98

def _with(settings, **values):
    out = copy.copy(settings)
    for name, value in values.items():
        setattr(out, name, value)
    return out


def test_full_8_bit_weights_are_simulated_exactly_too(prepared, settings, calibration):
    """INT8_REDUCE_RANGE=False: int8 weights use [-127, 127] and the PyTorch graph still
    computes the file's QDQ arithmetic (onnxruntime unfused, any CPU)."""
    out = qat.qat_finetune(_afnet(prepared), prepared.trial, 1e-3,
                           _with(settings, INT8_REDUCE_RANGE=False), 1, calibration, 1, 1250,
                           OPSET)
    assert not out.graph.reduce_range and _weight_qmax(out.int8) > 64
    x = _all_segments(prepared)
    with torch.no_grad():
        got = out.graph(torch.from_numpy(x).unsqueeze(-1)).numpy()
    _assert_same_as_onnxruntime(got, qdq_graph.onnx_logits(out.int8, x), out.int8, x)
    assert out.graph.weight_mismatch() == 0.0


# ----------------------------------------------------------------------------- the file

def test_int8_file_runs_in_onnxruntime_with_int8_weights(prepared, settings, calibration,
                                                        tmp_path):
    out = tmp_path / 'out' / 'saved.int8.onnx'
    size = qat.qat_int8(_afnet(prepared), prepared.trial, 1e-3, settings, 1, calibration,
                        str(out), 1, 1250, OPSET)
    assert size == os.path.getsize(out)
    assert os.listdir(out.parent) == ['saved.int8.onnx'], 'one self-contained file'
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    graph = proto.graph
    assert {'QuantizeLinear', 'DequantizeLinear'} <= {n.op_type for n in graph.node}
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    weighted = [n for n in graph.node if n.op_type in ('Conv', 'Gemm')]
    assert len(weighted) == 5 + 2 * 2 + 2        # 5 convs, 2 squeeze-excites, the head
    for node in weighted:
        dq = producer[node.input[1]]
        assert dq.op_type == 'DequantizeLinear', node
        assert initializers[dq.input[0]].dtype == np.int8, node
        assert producer[node.input[0]].op_type == 'DequantizeLinear', 'uint8 activation'
    assert all(name.startswith('t') for name in initializers), 'compact names'
    logits = onnx_predict(str(out), _all_segments(prepared))
    assert logits.shape == (len(_all_segments(prepared)), 2)
    assert np.isfinite(logits).all()


@pytest.mark.parametrize('reduce_range', [True, False], ids=['7-bit', '8-bit'])
def test_epoch_zero_with_min_max_ranges_is_post_training_quantization_byte_for_byte(
        prepared, settings, calibration, tmp_path, reduce_range):
    model = _afnet(prepared)
    export_onnx(model, str(tmp_path / 'float.onnx'), 1, 1250, OPSET)
    quantize_int8(str(tmp_path / 'float.onnx'), str(tmp_path / 'ptq.onnx'), calibration,
                  reduce_range=reduce_range)
    outcome = qat.qat_finetune(model, prepared.trial, 1e-3,
                               _with(settings, INT8_REDUCE_RANGE=reduce_range), 0, calibration,
                               1, 1250, OPSET, ranges=(None,))
    qat.write_int8(outcome.int8, str(tmp_path / 'qat0.onnx'))
    assert (tmp_path / 'qat0.onnx').read_bytes() == (tmp_path / 'ptq.onnx').read_bytes()


def _activation_scales(model_proto):
    values = {t.name: numpy_helper.to_array(t) for t in model_proto.graph.initializer}
    return np.array([float(values[n.input[1]]) for n in model_proto.graph.node
                     if n.op_type == 'QuantizeLinear'])


def test_percentile_ranges_clip_calibration_outliers(prepared, settings, calibration):
    model = _afnet(prepared)
    def run(ranges):
        return qat.qat_finetune(model, prepared.trial, 1e-3, settings, 0, calibration, 1, 1250,
                                OPSET, ranges=ranges)
    min_max, percentile = run((None,)), run((99.99,))
    assert (min_max.percentile, percentile.percentile) == (None, 99.99)
    min_max, percentile = _activation_scales(min_max.int8), _activation_scales(percentile.int8)
    assert len(min_max) == len(percentile) > 0
    assert (percentile <= min_max * (1 + 1e-6)).all(), 'a percentile range is never wider'
    assert (percentile < min_max * 0.99).any(), 'outliers clipped'


def test_fine_tuning_starts_from_the_better_range_method(outcome):
    assert qat.RANGES == (None, 99.99)
    assert set(outcome.start_losses) == {None, 99.99}
    assert outcome.history[0][2] == min(outcome.start_losses.values())
    assert outcome.start_losses[outcome.percentile] == outcome.history[0][2]


@pytest.mark.parametrize('ranges, ok', [((None,), True), ((100,), True), ((None, 50.5), True),
                                        ((), False), ((0,), False), ((100.1,), False)])
def test_ranges_are_min_max_or_percentiles(prepared, settings, calibration, ranges, ok):
    def run():
        return qat.qat_finetune(_afnet(prepared), prepared.trial, 1e-3, settings, 0,
                                calibration, 1, 1250, OPSET, ranges=ranges)
    if ok:
        assert run().percentile in ranges
    else:
        with pytest.raises(SettingsError,
                           match=r'ranges must hold None or percentiles in \(0, 100\]'):
            run()


def test_onnxruntime_agrees_with_the_fake_quantized_pytorch_graph(outcome, prepared, tmp_path):
    assert outcome.graph.reduce_range and _weight_qmax(outcome.int8) <= 64, 'the default'
    x = _all_segments(prepared)
    path = tmp_path / 'm.onnx'
    qat.write_int8(outcome.int8, str(path))
    expected = onnx_predict(str(path), x)
    with torch.no_grad():
        got = outcome.graph(torch.from_numpy(x).unsqueeze(-1)).numpy()
    _assert_same_as_onnxruntime(got, expected, outcome.int8, x)
    assert outcome.graph.weight_mismatch() == 0.0, 'int8 weights and int32 biases as onnxruntime'
    # ... and it is the quantized graph: with every Q/DQ and weight left float it computes
    # something else (the float model with the fine-tuned weights)
    graph = outcome.graph
    graph.unquantized = {n.input[1] for n in graph.qdq.graph.node if n.op_type == 'QuantizeLinear'}
    graph.float_weights = True
    try:
        with torch.no_grad():
            unquantized = graph(torch.from_numpy(x).unsqueeze(-1)).numpy()
    finally:
        graph.unquantized, graph.float_weights = set(), False
    assert not np.allclose(unquantized, got, atol=1e-4)


def test_all_float_graph_is_the_float_model(prepared, calibration, tmp_path):
    """The switches quantization_sensitivity uses: nothing quantized = the float model."""
    model = _afnet(prepared)
    prepared_graph = qdq_graph.prepare_float_graph(model, 1, 1250, OPSET, str(tmp_path))
    graph = qdq_graph.FakeQuantGraph(prepared_graph, qdq_graph.quantize_qdq(prepared_graph, calibration))
    x = torch.from_numpy(_all_segments(prepared)).unsqueeze(-1)
    with torch.no_grad():
        reference = model(x)
    rows = qat.quantization_sensitivity(graph, x, lambda logits: (logits - reference).abs().max())
    assert [name for name, _ in rows[:3]] == ['nothing (INT8)', 'weights', 'activations']
    graph.unquantized = {n.input[1] for n in graph.qdq.graph.node if n.op_type == 'QuantizeLinear'}
    graph.float_weights = True
    with torch.no_grad():
        float_error = float((graph(x) - reference).abs().max())
    assert float_error < 1e-5
    assert rows[0][1] > 10 * max(float_error, 1e-6), 'INT8 differs from float'


def test_kept_epoch_is_the_one_with_the_lowest_validation_loss(outcome):
    losses = [val for _, _, val in outcome.history]
    assert [epoch for epoch, _, _ in outcome.history] == [0, 1, 2]
    assert outcome.best_epoch == int(np.argmin(losses))
    assert np.isfinite(losses).all()


def test_without_validation_data_the_training_loss_decides(prepared, settings, calibration):
    t = prepared.trial
    data = TrialData(t.x_train, t.y_train, t.x_val[:0], t.y_val[:0])
    outcome = qat.qat_finetune(_afnet(prepared), data, 1e-3, settings, 2, calibration, 1, 1250,
                               OPSET)
    assert [val for _, _, val in outcome.history[1:]] == [tr for _, tr, _ in outcome.history[1:]]
    assert outcome.best_epoch == 1 + int(np.argmin([tr for _, tr, _ in outcome.history[1:]]))


def test_same_seed_same_bytes_other_seed_other_bytes(prepared, settings, calibration, tmp_path):
    model = _warmed(lambda: ss_model.AFNet(ss_model.generate_config(1, 1, 1250)),
                    prepared.trial.x_train, steps=100)
    # validated on its training segments, fine-tuning improves on PTQ even on this tiny set,
    # so the files compared hold fine-tuned weights, not PTQ's
    t = prepared.trial
    data = TrialData(t.x_train, t.y_train, t.x_train, t.y_train)
    other = copy.copy(settings)
    other.SEED = settings.SEED + 1
    files = []
    for i, s in enumerate((settings, settings, other)):
        outcome = qat.qat_finetune(model, data, 3e-3, s, 2, calibration, 1, 1250, OPSET,
                                   ranges=(None,))   # min/max ranges: more to gain
        assert outcome.best_epoch > 0, f"fine-tuning kept PTQ: {outcome.history}"
        qat.write_int8(outcome.int8, str(tmp_path / f"{i}.onnx"))     # what qat_int8 does
        files.append((tmp_path / f"{i}.onnx").read_bytes())
    assert files[0] == files[1]
    assert files[0] != files[2]


def test_the_float_model_is_not_modified(prepared, settings, calibration, tmp_path):
    model = _afnet(prepared)
    model.train()
    before = copy.deepcopy(model.state_dict())
    qat.qat_int8(model, prepared.trial, 1e-2, settings, 1, calibration,
                 str(tmp_path / 'm.onnx'), 1, 1250, OPSET)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training, 'train/eval mode kept'
    assert all(p.requires_grad for p in model.parameters())
    assert not model._forward_hooks and not model._forward_pre_hooks


# ----------------------------------------------------------------------------- losses

@pytest.mark.parametrize('multilabel, criterion, reference', [
    (False, nn.CrossEntropyLoss, F.cross_entropy),
    (True, nn.BCEWithLogitsLoss, F.binary_cross_entropy_with_logits),
], ids=['class-labels', 'multi-hot'])
def test_loss_follows_the_labels(prepared, settings, calibration, tmp_path, multilabel,
                                 criterion, reference):
    trial = prepared.trial
    classes = 3
    model = _afnet(prepared, num_classes=classes)
    if multilabel:
        rng = np.random.default_rng(0)
        y_train, y_val = (torch.from_numpy((rng.random((n, classes)) < 0.4).astype(np.float32))
                          for n in (len(trial.y_train), len(trial.y_val)))
    else:
        y_train, y_val = trial.y_train % classes, trial.y_val % classes
    data = TrialData(trial.x_train, y_train, trial.x_val, y_val)
    objective = qat._Objective(model, data, settings, label_weight=1.0, device=torch.device('cpu'))
    assert type(objective.criterion) is criterion
    logits = torch.randn(len(y_val), classes)
    targets = objective.targets(trial.x_val.unsqueeze(-1), y_val)
    assert torch.isclose(objective.loss(logits, targets), reference(logits, y_val), atol=1e-6)
    size = qat.qat_int8(model, data, 1e-3, settings, 1, calibration, str(tmp_path / 'm.onnx'),
                        1, 1250, OPSET)
    assert size > 0
    logits = onnx_predict(str(tmp_path / 'm.onnx'), trial.x_val.numpy())
    assert logits.shape == (len(y_val), classes)


def test_distillation_targets_are_the_float_models_probabilities(prepared, settings):
    model = _afnet(prepared)
    objective = qat._Objective(model, prepared.trial, settings, label_weight=0.0,
                               device=torch.device('cpu'))
    x = prepared.trial.x_val.unsqueeze(-1)
    with torch.no_grad():
        expected = torch.softmax(model(x), dim=1)
        targets = objective.targets(x, prepared.trial.y_val)
        assert torch.allclose(targets, expected)
        assert objective.loss(model(x), targets).abs() < 1e-5, 'KL of the teacher to itself'


@pytest.mark.parametrize('epochs, ok', [(0, True), (-1, False), (1.5, False), (True, False)])
def test_epochs_must_be_an_int_at_least_zero(prepared, settings, calibration, epochs, ok):
    model = _afnet(prepared)
    if ok:
        assert qat.qat_finetune(model, prepared.trial, 1e-3, settings, epochs, calibration,
                                1, 1250, OPSET).best_epoch == 0
    else:
        with pytest.raises(SettingsError, match=r'QAT_EPOCHS must be an int >= 0, got QAT_EPOCHS='):
            qat.qat_finetune(model, prepared.trial, 1e-3, settings, epochs, calibration,
                             1, 1250, OPSET)


# ----------------------------------------------------------------------------- what QAT handles

class _Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 9, 4)
        self.rnn = nn.GRU(4, 8, batch_first=True)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        h, _ = self.rnn(self.conv(x.squeeze(-1)).transpose(1, 2))
        return self.fc(h[:, -1])


class _Erf(nn.Module):
    def forward(self, x):
        return torch.erf(x)


class _ErfNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 9, 4)
        self.act = _Erf()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.act(self.conv(x.squeeze(-1))).mean(dim=2))


def test_unsupported_layer_is_named_with_its_path(prepared, settings, calibration, tmp_path):
    with pytest.raises(SettingsError, match=r"module 'rnn' of type torch\.nn\.modules\.rnn\.GRU"):
        qat.check_quantizable(_Recurrent())
    with pytest.raises(SettingsError, match=r"'rnn'.*GRU.*QAT_EPOCHS=0"):
        qat.qat_int8(_Recurrent(), prepared.trial, 1e-3, settings, 1, calibration,
                     str(tmp_path / 'm.onnx'), 1, 1250, OPSET)
    assert not (tmp_path / 'm.onnx').exists()


def test_unsupported_operator_is_named_with_its_module(prepared, settings, calibration, tmp_path):
    model = _ErfNet()
    qat.check_quantizable(model)           # layers alone look fine ...
    with pytest.raises(SettingsError, match=r"operator 'Erf' .*module 'act' of type _Erf"):
        qat.check_quantizable(model, in_channels=1, input_size=1250)   # ... its graph does not
    with pytest.raises(SettingsError, match=r"'Erf'"):
        qat.qat_int8(model, prepared.trial, 1e-3, settings, 1, calibration,
                     str(tmp_path / 'm.onnx'), 1, 1250, OPSET)


def _every_supported_layer():
    """One model holding every torch.nn layer type of qat.SUPPORTED_MODULES."""
    return nn.Sequential(
        nn.Conv1d(1, 4, 9, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.MaxPool1d(2),
        nn.Conv1d(4, 6, 5, 2, padding=2), nn.LeakyReLU(0.1), nn.AvgPool1d(2),
        nn.Tanh(), nn.Conv1d(6, 6, 3, groups=3), nn.ReLU6(),
        nn.Hardtanh(-0.5, 0.5), nn.SiLU(), nn.Sigmoid(), nn.Identity(),
        nn.Softmax(dim=1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(6 * 37, 8), nn.SiLU(),
        nn.Linear(8, 2))


class _Squeezed(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(x.squeeze(-1))


@pytest.mark.parametrize('build', [
    lambda: _Squeezed(_every_supported_layer()),
    lambda: add_normalization(ss_model.AFNet(ss_model.generate_config(1, 1, 1250))),
    lambda: SepNet(),
], ids=['every-supported-layer', 'afnet-normalized', 'sepnet'])
def test_supported_models_run_in_pytorch_exactly_as_in_onnxruntime(build, prepared, settings,
                                                                    calibration):
    model = _warmed(build, prepared.trial.x_train)
    leaf_types = {type(m) for m in model.modules() if type(m).__module__.startswith('torch.')}
    if isinstance(model, _Squeezed):
        wanted = {t for t in qat.SUPPORTED_MODULES
                  if t not in (nn.Sequential, nn.ModuleList, nn.ModuleDict)}
        assert wanted <= leaf_types, f"not covered: {wanted - leaf_types}"
    qat.check_quantizable(model, in_channels=1, input_size=1250)
    out = qat.qat_finetune(model, prepared.trial, 1e-3, settings, 1, calibration, 1, 1250, OPSET)
    x = _all_segments(prepared)
    with torch.no_grad():
        got = out.graph(torch.from_numpy(x).unsqueeze(-1)).numpy()
    expected = qdq_graph.onnx_logits(out.int8, x)
    _assert_same_as_onnxruntime(got, expected, out.int8, x)
    assert out.graph.weight_mismatch() == 0.0
