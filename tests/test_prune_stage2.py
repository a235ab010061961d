"""Pruned variants as stage-two candidates (PRUNE_FRACTIONS): planned with their exact
size, trained (base training, pruning, fine-tuning) like any candidate, recorded, and
delivered as a physically smaller model whose saved.pth reloads."""
import json
import os

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch

from public.core.settings import SettingsError
from public.core.interrupts import NoInterrupts
from public.compress.channel_prune import prune_model
from public.search.stage_two import build_from_config, plan_candidates, run_stage_two


def test_the_plan_lists_pruned_variants_smaller_than_their_parent(make_settings):
    settings = make_settings(CHANNEL_SCALES=(2,), FC_SCALES=(2,), PRUNE_FRACTIONS=(0.25, 0.5))
    plan = {k.name: k for k in plan_candidates(settings, 1250, 1)}
    assert set(plan) == {'c2-f2', 'c2-f2-p25', 'c2-f2-p50'}
    assert plan['c2-f2-p50'].predicted_bytes < plan['c2-f2-p25'].predicted_bytes \
        < plan['c2-f2'].predicted_bytes
    assert plan['c2-f2-p50'].prune == 0.5 and plan['c2-f2-p50'].config == plan['c2-f2'].config


def test_a_pruned_candidate_trains_to_its_predicted_size_and_reloads(make_settings, prepared):
    # The size cap admits only the pruned variant: it is trained and published (as the
    # target, or as the best under the cap: a 2-epoch model on the small data may not learn).
    base = make_settings(CHANNEL_SCALES=(2,), FC_SCALES=(1,), PRUNE_FRACTIONS=(0.5,))
    plan = {k.name: k for k in plan_candidates(base, 1250, 1)}
    cap_kb = (plan['c2-f1-p50'].predicted_bytes + 10) / 1024
    settings = make_settings(CHANNEL_SCALES=(2,), FC_SCALES=(1,), PRUNE_FRACTIONS=(0.5,),
                             PRUNE_EPOCHS=1, NUM_EPOCHS=2, METRIC_TARGET=1,
                             SIZE_TARGET_KB=cap_kb)
    final, met, rows = run_stage_two(settings, prepared, NoInterrupts(), log=lambda m: None,
                                     progress=False)
    assert final
    by_name = {r['candidate']: r for r in rows}
    assert by_name['c2-f1']['status'] == 'over-size'
    pruned = by_name['c2-f1-p50']
    assert pruned['status'] == 'ok' and float(pruned['prune_fraction']) == 0.5
    assert int(pruned['onnx_bytes']) == int(pruned['predicted_bytes'])
    assert int(pruned['epochs']) == 3            # 2 base epochs + 1 fine-tuning epoch
    info = json.load(open(os.path.join(final, 'result.json')))
    assert info['prune_fraction'] == 0.5
    text = open(os.path.join(final, 'evaluation_metrics.txt')).read()
    assert 'Pruned: 50 %' in text
    # saved.pth reloads into the parent architecture pruned the same way, and is saved.onnx
    model = prune_model(build_from_config(info['config']), 0.5, torch.zeros(2, 1, 1250, 1))
    model.load_state_dict(torch.load(os.path.join(final, 'saved.pth'), weights_only=True))
    x = prepared.x_test[:4].numpy()[..., None]
    session = ort.InferenceSession(os.path.join(final, 'saved.onnx'),
                                   providers=['CPUExecutionProvider'])
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {'input': x})[0],
                                   model.eval()(torch.from_numpy(x)).numpy(), atol=1e-4)


def test_an_unprunable_stage_two_model_is_a_settings_error_naming_the_operator(
        monkeypatch, make_settings):
    import public.ss_model as ss_model
    from public.model import ShuffleNetV2
    monkeypatch.setattr(ss_model, 'AFNet', lambda config: ShuffleNetV2(1250))
    settings = make_settings(CHANNEL_SCALES=(1,), FC_SCALES=(1,), PRUNE_FRACTIONS=(0.5,))
    with pytest.raises(SettingsError, match="cannot prune ShuffleNetV2: operator 'cat'"):
        plan_candidates(settings, 1250, 1)


@pytest.mark.parametrize('fractions', [(0.5, 0.501), (1.0,), (0,), (-0.2,)])
def test_bad_prune_fractions_are_settings_errors(make_settings, fractions):
    with pytest.raises(SettingsError, match='PRUNE_FRACTIONS must be'):
        make_settings(PRUNE_FRACTIONS=fractions)
