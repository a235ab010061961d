"""Stage two: scale the chosen architecture's widths until metric and size targets both meet.

    plan = plan_candidates(settings, input_size, in_channels)   # exact ONNX sizes, untrained
    run_stage_two(settings, data, interrupts)

A model's ONNX size depends only on its architecture, so each candidate (channel factor,
FC factor) is exported untrained to learn its exact size before any training. Candidates
over SIZE_TARGET_KB are recorded as 'over-size' and never trained; the others are trained
smallest first with the stage-one trial procedure, so the first that meets METRIC_TARGET is
the smallest model that meets both. Every candidate's files live in temp/c<C>-f<F>/; the
winner is copied atomically to <FINAL_RESULT_DIR>/<xx>-<yy>/.
"""
import hashlib
import inspect
import json
import os
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch

from public.config import SettingsError, settings_dict
from public.export import export_onnx, onnx_predict, size_kb
from public.quantize import quantize_int8
from public.results import STAGE2_COLUMNS, ResultsTable, replace_folder, write_result_files
from public.search import _TRIAL_SETTINGS, best_rank
from public.test import (METRIC_NAMES, classification_metrics, percent, score_digits,
                         selection_score)
from public.results import recover_folders
from public.trial import STATUS_DIVERGED, STATUS_FAILED, STATUS_OK, run_trial

STAGE2_CSV = 'stage2_results.csv'
STATUS_OVER_SIZE = 'over-size'


@dataclass
class Candidate:
    channel_scale: int
    fc_scale: int
    config: dict
    predicted_bytes: int

    @property
    def name(self):
        return f"c{self.channel_scale}-f{self.fc_scale}"


class SizeBudget:
    """The feasibility question: does an ONNX file of this many bytes fit SIZE_TARGET_KB?"""

    def __init__(self, size_target_kb):
        self.limit_bytes = int(size_target_kb * 1024)

    def fits(self, size_bytes):
        return size_bytes <= self.limit_bytes


def _ss_model():
    import public.ss_model as ss_model
    for attr in ('generate_config', 'AFNet'):
        if not hasattr(ss_model, attr):
            raise SettingsError(f"public/ss_model.py must define {attr}; see its docstring")
    return ss_model


def build_candidate_model(ss_model, config):
    return ss_model.AFNet(config)


def _like_trained(model, seed=0):
    """Give every parameter and float buffer distinct random values, as training does.

    The ONNX exporter stores identical initializers once: an untrained model's BatchNorm
    tensors (all ones / all zeros) would share storage and export ~1 % smaller than the
    same model after training. With distinct values the probe's size is the trained size."""
    import torch
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
    return model


def plan_candidates(settings, input_size, in_channels, num_classes=2, probe_dir=None,
                    calibration_x=None):
    """Every (channel, fc) pair with its exact ONNX size, smallest first.

    A config that does not build or run is a misconfiguration of public/ss_model.py: it
    raises SettingsError naming the factors and the cause, before any training."""
    import torch
    ss_model = _ss_model()
    probe_dir = probe_dir or settings.TEMP_DIR
    os.makedirs(probe_dir, exist_ok=True)
    probe = os.path.join(probe_dir, 'size-probe.onnx')
    candidates = []
    for c in settings.CHANNEL_SCALES:
        for f in settings.FC_SCALES:
            try:
                config = ss_model.generate_config(c, f, input_size, in_channels=in_channels,
                                                  num_classes=num_classes)
                model = build_candidate_model(ss_model, config)
                model.eval()
                with torch.no_grad():
                    out = model(torch.zeros(2, in_channels, input_size, 1))
                if tuple(out.shape) != (2, num_classes):
                    raise ValueError(f"output shape {tuple(out.shape)}, expected (2, {num_classes})")
                size = export_onnx(_like_trained(model), probe, in_channels, input_size,
                                   settings.ONNX_OPSET)
                if settings.QUANTIZE_INT8:
                    # INT8 files vary by a few bytes with the weights: a prediction, re-checked
                    # on the trained model.
                    size = quantize_int8(probe, probe + '.int8', calibration_x)
                    os.remove(probe + '.int8')
            except SettingsError:
                raise
            except Exception as exc:
                raise SettingsError(
                    f"public/ss_model.py: generate_config({c}, {f}, input_size={input_size}) "
                    f"does not give a model that builds and runs on input "
                    f"(N, {in_channels}, {input_size}, 1): {type(exc).__name__}: {exc}") from exc
            candidates.append(Candidate(c, f, config, size))
    if os.path.exists(probe):
        os.remove(probe)
    return sorted(candidates, key=lambda k: (k.predicted_bytes, k.channel_scale, k.fc_scale))


def stage_two_key(settings):
    values = settings_dict(settings)
    keyed = {k: values[k] for k in _TRIAL_SETTINGS + ('LEARNING_RATE', 'QUANTIZE_INT8')}
    import public.ss_model as ss_model
    keyed['ss_model'] = hashlib.sha1(inspect.getsource(ss_model).encode()).hexdigest()
    blob = json.dumps(keyed, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def _row(candidate, settings, key, result=None, status=None, meets=False):
    row = dict(candidate=candidate.name, channel_scale=candidate.channel_scale,
               fc_scale=candidate.fc_scale, predicted_bytes=candidate.predicted_bytes,
               lr=repr(settings.LEARNING_RATE), seed=settings.SEED, settings_key=key,
               select_on=settings.SELECT_ON, finished_at=time.strftime('%Y-%m-%dT%H:%M:%S'),
               status=status or result.status, meets_metric=meets,
               select_metric=settings.SELECT_METRIC)
    if result is not None:
        selected = result.selected(settings.SELECT_ON)
        xx, yy = score_digits(selected) if selected else ('', '')
        row.update(stop_reason=result.stop_reason, epochs=result.epochs,
                   best_epoch=result.best_epoch, xx=xx, yy=yy,
                   score=selection_score(selected, settings.SELECT_METRIC) if selected else '',
                   onnx_kb=size_kb(result.onnx_bytes) if result.onnx_bytes else '',
                   onnx_bytes=result.onnx_bytes or '', latency_ms=result.latency_ms,
                   params=result.params, wall_s=result.wall_s,
                   error=result.error.splitlines()[0] if result.error else '')
        for split, metrics in (('val', result.val_metrics), ('test', result.test_metrics)):
            for m in METRIC_NAMES + ('auc', 'abs_sum'):
                row[f"{split}_{m}"] = metrics.get(m, '') if metrics else ''
        int8 = getattr(result, 'int8', None)
        if int8:
            # With QUANTIZE_INT8 the INT8 model is the deliverable: its metrics and size decide.
            xx, yy = score_digits(int8[settings.SELECT_ON])
            row.update(xx=xx, yy=yy, int8_bytes=int8['bytes'], onnx_kb=size_kb(int8['bytes']),
                       score=selection_score(int8[settings.SELECT_ON], settings.SELECT_METRIC),
                       int8_metrics={'val': int8['val'], 'test': int8['test']})
    return row


def _add_int8(result, data, settings):
    """Quantize the trained candidate's ONNX and measure the INT8 model with onnxruntime."""
    float_path = os.path.join(settings.TEMP_DIR, 'stage2-trial.onnx')
    int8_path = os.path.join(settings.TEMP_DIR, 'stage2-trial.int8.onnx')
    size = quantize_int8(float_path, int8_path, _calibration(data))
    measured = {'bytes': size}
    for split, x, y in (('val', data.trial.x_val, data.trial.y_val.cpu().numpy()),
                        ('test', data.x_test, data.y_test)):
        if len(x):
            logits = onnx_predict(int8_path, x.cpu().numpy())
            probs = np.exp(logits - logits.max(1, keepdims=True))
            measured[split] = classification_metrics(y, probs / probs.sum(1, keepdims=True),
                                                     data.num_classes)
        else:
            measured[split] = {}
    result.int8 = measured
    return result


def _calibration(data, count=256):
    # A seeded sample of training segments fixes the activation ranges.
    x = data.trial.x_train
    idx = np.random.default_rng(0).permutation(len(x))[:count]
    return x[torch.as_tensor(idx)].cpu().numpy()


def _deliverable_fits(row, budget, settings):
    """Whether the file that would be delivered (INT8 when quantizing) fits the budget now."""
    size = row.get('int8_bytes') if settings.QUANTIZE_INT8 else row.get('onnx_bytes')
    return bool(size) and budget.fits(int(size))


def _meets_metric(row, settings):
    return (row['status'] == STATUS_OK and row['score'] != ''
            and 100 * float(row['score']) >= settings.METRIC_TARGET - 1e-9)


def _publish(settings, candidate_dir, row, met, log):
    """Copy a candidate's folder to <FINAL_RESULT_DIR>/<xx>-<yy>/ atomically."""
    name = f"{row['xx']}-{row['yy']}"

    def build(folder):
        for f in os.listdir(candidate_dir):
            shutil.copy2(os.path.join(candidate_dir, f), os.path.join(folder, f))
        with open(os.path.join(folder, 'evaluation_metrics.txt'), 'a') as f:
            f.write(f"\nStage two: {'meets' if met else 'does NOT meet'} both targets "
                    f"(METRIC_TARGET={settings.METRIC_TARGET}, SIZE_TARGET_KB={settings.SIZE_TARGET_KB})\n")
        stage_table = os.path.join(settings.TEMP_DIR, STAGE2_CSV)
        if os.path.exists(stage_table):
            shutil.copy2(stage_table, os.path.join(folder, STAGE2_CSV))
    final = replace_folder(settings.FINAL_RESULT_DIR, name, build)
    log(f"Result: {final}/")
    return final


def run_stage_two(settings, data, interrupts, log=print, progress=True, trainer=run_trial):
    """The stage-two search; returns (result folder or None, met: bool, rows)."""
    os.makedirs(settings.TEMP_DIR, exist_ok=True)
    for folder in (settings.TEMP_DIR, settings.FINAL_RESULT_DIR):
        for action in recover_folders(folder):      # a crash mid-write in an earlier run
            log(f"  {folder}: {action}")
    budget = SizeBudget(settings.SIZE_TARGET_KB)
    candidates = plan_candidates(settings, data.input_size, data.in_channels, data.num_classes,
                                 calibration_x=_calibration(data) if settings.QUANTIZE_INT8 else None)
    table = ResultsTable(os.path.join(settings.TEMP_DIR, STAGE2_CSV), STAGE2_COLUMNS)
    key = stage_two_key(settings)
    earlier = {r['candidate']: r for r in table.rows()
               if r['settings_key'] == key and r['status'] != STATUS_FAILED}
    log(f"Stage two plan: {len(candidates)} candidate(s) at LEARNING_RATE={settings.LEARNING_RATE}; "
        f"targets: min metric >= {settings.METRIC_TARGET} %, ONNX <= {settings.SIZE_TARGET_KB} KB "
        f"({budget.limit_bytes} bytes)")
    for k in candidates:
        fate = 'train' if budget.fits(k.predicted_bytes) else 'over size budget: never trained'
        done = ' (finished earlier: not retrained)' if k.name in earlier and fate == 'train' else ''
        log(f"  {k.name:>8}  channels {k.config.get('channels', '?')}, fc {k.config.get('fc_hidden', '?')}: "
            f"{k.predicted_bytes} bytes ({size_kb(k.predicted_bytes)} KB)  {fate}{done}")
    if earlier:
        log(f"Resuming from {table.path}: {len(earlier)} candidate(s) already recorded")
    import public.ss_model as ss_model
    with interrupts.critical():                     # the plan's verdicts, recorded up front
        for k in candidates:
            if (not budget.fits(k.predicted_bytes)
                    and earlier.get(k.name, {}).get('status') != STATUS_OVER_SIZE):
                table.append(_row(k, settings, key, status=STATUS_OVER_SIZE))
    winner = None
    for k in candidates:
        if not budget.fits(k.predicted_bytes):
            continue
        candidate_dir = os.path.join(settings.TEMP_DIR, k.name)
        previous = earlier.get(k.name, {})
        if previous.get('status') == STATUS_DIVERGED:
            log(f"  {k.name}: diverged in an earlier run; not retrained")
            continue
        if previous.get('status') == STATUS_OK and os.path.isdir(candidate_dir):
            if _meets_metric(previous, settings):
                if _deliverable_fits(previous, budget, settings):
                    winner = (candidate_dir, previous)
                    log(f"  {k.name}: finished earlier and meets the metric target")
                    break
            continue
        result = trainer(lambda: build_candidate_model(ss_model, k.config), settings.LEARNING_RATE,
                         data, settings, os.path.join(settings.TEMP_DIR, 'stage2-trial.onnx'),
                         progress=progress, desc=f"{k.name}")
        if result.status == STATUS_OK and settings.QUANTIZE_INT8:
            try:
                _add_int8(result, data, settings)
            except Exception as exc:
                result.status, result.error = STATUS_FAILED, f"INT8 quantization failed: {exc}"
        if result.status == STATUS_OK and not settings.QUANTIZE_INT8 and result.onnx_bytes != k.predicted_bytes:
            log(f"  warning: {k.name}: trained ONNX is {result.onnx_bytes} bytes, predicted "
                f"{k.predicted_bytes}")
        row = _row(k, settings, key, result)
        row['meets_metric'] = _meets_metric(row, settings) and (
            not settings.QUANTIZE_INT8 or budget.fits(int(row['int8_bytes'])))
        with interrupts.critical():
            if result.status == STATUS_OK:
                _save_candidate(settings, k, result, candidate_dir)
            table.append(row)
        log(f"  {k.name}: {result.status}, {settings.SELECT_ON} {row.get('xx', '')}-{row.get('yy', '')}, "
            f"{row.get('onnx_kb', '')} KB, {result.wall_s:.1f} s"
            + (f" ({row['error']})" if result.error else ''))
        if row['meets_metric']:
            winner = (candidate_dir, row)
            break
    rows = [r for r in table.rows() if r['settings_key'] == key]
    if winner:
        log(f"{winner[1]['candidate']} meets both targets: the smallest such model.")
        return _publish(settings, *winner, True, log), True, rows
    trained = [r for r in rows if r['status'] == STATUS_OK and _deliverable_fits(r, budget, settings)
               and os.path.isdir(os.path.join(settings.TEMP_DIR, r['candidate']))]
    if not trained:
        log("No candidate meets both targets, and none under the size cap trained successfully "
            f"(SIZE_TARGET_KB={settings.SIZE_TARGET_KB}: raise it or lower CHANNEL_SCALES / FC_SCALES).")
        return None, False, rows
    best = max(trained, key=best_rank)
    log(f"No candidate meets both targets. Best under the size cap: {best['candidate']} with "
        f"{settings.SELECT_METRIC}={100 * float(best['score']):.1f} "
        f"({100 * float(best['score']) - settings.METRIC_TARGET:+.1f} points from METRIC_TARGET="
        f"{settings.METRIC_TARGET}), {best['onnx_kb']} KB ({float(best['onnx_kb']) - settings.SIZE_TARGET_KB:+.0f} KB "
        f"from SIZE_TARGET_KB={settings.SIZE_TARGET_KB}).")
    return _publish(settings, os.path.join(settings.TEMP_DIR, best['candidate']), best, False, log), False, rows


def _save_candidate(settings, candidate, result, candidate_dir):
    other = result.test_metrics if settings.SELECT_ON == 'val' else result.val_metrics
    name = os.path.basename(candidate_dir)

    def build(folder):
        write_result_files(folder, name=name, state_dict=result.state_dict,
                           onnx_path=os.path.join(settings.TEMP_DIR, 'stage2-trial.onnx'),
                           selected_metrics=result.selected(settings.SELECT_ON),
                           other_metrics=other, select_on=settings.SELECT_ON,
                           lr=settings.LEARNING_RATE, model_name='ss_model.AFNet',
                           onnx_bytes=result.onnx_bytes, settings=settings,
                           extra_lines=[f"Channel scaling factor: {candidate.channel_scale}",
                                        f"FC scaling factor: {candidate.fc_scale}"]
                           + ([f"INT8 ONNX file size: {size_kb(result.int8['bytes'])} KB "
                               f"(saved.int8.onnx, the deliverable: QUANTIZE_INT8=True)"]
                              if result.int8 else []),
                           info={'channel_scale': candidate.channel_scale,
                                 'fc_scale': candidate.fc_scale, 'config': candidate.config,
                                 'latency_ms': result.latency_ms, 'params': result.params,
                                 'int8': getattr(result, 'int8', None)})
        if getattr(result, 'int8', None):
            shutil.copyfile(os.path.join(settings.TEMP_DIR, 'stage2-trial.int8.onnx'),
                            os.path.join(folder, 'saved.int8.onnx'))
            with open(os.path.join(folder, 'evaluation_metrics.txt'), 'a') as f:
                f.write(f"\nINT8 model (saved.int8.onnx, static quantization, QDQ):\n"
                        f"ONNX file size: {size_kb(result.int8['bytes'])} KB\n"
                        + '\n'.join(f"{split} split: " + ', '.join(
                            f"{m} {v:.4f}" for m, v in result.int8[split].items())
                            for split in ('val', 'test') if result.int8[split]) + '\n')
    replace_folder(settings.TEMP_DIR, name, build)
