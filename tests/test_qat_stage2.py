"""QAT_EPOCHS in stage two: the quantization-aware INT8 model is the deliverable, its
onnxruntime-measured metrics decide, and post-training INT8's figures are kept beside."""
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from torch import nn

from public.core.settings import SettingsError
from public.core.interrupts import NoInterrupts
from public.search.stage_two import run_stage_two


def test_stage_two_delivers_the_qat_int8_model(make_settings, prepared):
    settings = make_settings(CHANNEL_SCALES=(1,), FC_SCALES=(1,), QUANTIZE_INT8=True,
                             QAT_EPOCHS=1, NUM_EPOCHS=2, METRIC_TARGET=1, SIZE_TARGET_KB=500)
    final, met, rows = run_stage_two(settings, prepared, NoInterrupts(), log=lambda m: None,
                                     progress=False)
    assert final
    [row] = rows
    recorded = json.loads(row['int8_metrics'])
    assert recorded['method'] == 'qat' and set(recorded['ptq']) == {'val', 'test'}
    info = json.load(open(os.path.join(final, 'result.json')))
    assert info['int8']['method'] == 'qat' and info['int8']['epochs'] == 1
    assert info['int8']['ptq']['bytes'] > 0
    path = os.path.join(final, 'saved.int8.onnx')
    assert int(row['int8_bytes']) == os.path.getsize(path) == info['int8']['bytes']
    model = onnx.load(path)
    assert {'QuantizeLinear', 'DequantizeLinear'} <= {n.op_type for n in model.graph.node}
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    out = session.run(None, {'input': prepared.x_test[:4].numpy()[..., None]})[0]
    assert out.shape == (4, 2) and np.isfinite(out).all()
    text = open(os.path.join(final, 'evaluation_metrics.txt')).read()
    assert 'Quantization-aware training: 1 epoch(s)' in text


def test_qat_needs_quantize_int8(make_settings):
    with pytest.raises(SettingsError, match='QAT_EPOCHS=2 .* needs QUANTIZE_INT8=True'):
        make_settings(QAT_EPOCHS=2)


class _GruNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(1, 4, batch_first=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        out, _ = self.rnn(x.squeeze(-1).transpose(1, 2))
        return self.fc(out[:, -1])


def test_a_model_qat_cannot_quantize_stops_stage_two_naming_it(monkeypatch, make_settings,
                                                              prepared):
    import public.ss_model as ss_model
    monkeypatch.setattr(ss_model, 'AFNet', lambda config: _GruNet())
    settings = make_settings(CHANNEL_SCALES=(1,), FC_SCALES=(1,), QUANTIZE_INT8=True,
                             QAT_EPOCHS=1, SIZE_TARGET_KB=500)
    with pytest.raises(SettingsError, match=r"'rnn'.*GRU"):
        run_stage_two(settings, prepared, NoInterrupts(), log=lambda m: None, progress=False)
