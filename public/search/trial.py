"""One trial, the unit both stages are made of: build, train, evaluate, export, check; and
the job a worker runs for it (the trial, then INT8, QAT and REFIT where they are asked for).

    data = prepare_data(settings)                         # public.data.prepare
    result = run_trial(lambda: AFNet(...), lr, data, settings, onnx_path)
    result = run_trial_job(TrialSpec(key='AFNet@0.0025', build=..., lr=..., settings=...), data)

A trial that fails (the model does not build or run on the input shape, the loss turns
NaN, export fails) comes back as a TrialResult with status 'failed' or 'diverged' and the
traceback, never as an exception: a failed candidate is not a failed run. Only an
interruption (KeyboardInterrupt) propagates.
"""
import copy
import dataclasses
import inspect
import os
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass

import numpy as np
import torch

from public.compress.channel_prune import prune_model
from public.compress.export import check_onnx, export_onnx, onnx_latency_ms, onnx_predict
from public.compress.graph_stats import graph_stats
from public.compress.qat import qat_int8
from public.compress.quantize import quantize_int8
from public.data.prepare import calibration_sample, on_device
from public.search.progress import EpochReporter
from public.train.loop import (STOP_BUDGET, STOP_DIVERGED, refit_schedule, seed_everything, train_fixed,
                               train_model)
from public.train.metrics import (Scoring, add_contest_score, classification_metrics, evaluate,
                                  probabilities, selection_score)
from public.train.outcome import TrialResult, TrialStatus
from public.train.recipe import add_normalization
from public.train.threshold import calibrate


def check_model_runs(model, data):
    """Forward a batch of 2 real-shaped inputs; raise with a clear message if it cannot."""
    x = data.trial.x_train[:2].unsqueeze(-1)
    out = model(x)
    if tuple(out.shape) != (len(x), data.num_classes):
        raise ValueError(f"model output has shape {tuple(out.shape)} for input "
                         f"{tuple(x.shape)}; expected ({len(x)}, {data.num_classes})")


def run_trial(build_model, lr, data, settings, onnx_path, progress=True, desc='train',
              latency=True, prune_fraction=0.0, on_epoch=None, checkpoint=None, budget=0):
    """Build a fresh seeded model, train, evaluate on val and test, export and check ONNX.
    With prune_fraction, the trained model then loses that fraction of its channels and
    hidden units (smallest L1 norm first, public/compress/channel_prune.py) and is fine-tuned PRUNE_EPOCHS.
    With checkpoint (a file path), the training saves its state there after every epoch and
    resumes from it (train_model); the pruned fine-tuning is short and starts over. With
    budget (SCHEDULER='halving'), training goes to at most that many epochs in all."""
    start = time.perf_counter()
    result = TrialResult(status=TrialStatus.FAILED)
    try:
        seed_everything(settings.SEED)
        model = build_model()
        if settings.NORMALIZE == 'segment':
            add_normalization(model)
        model = model.to(data.device)
        result.params = sum(p.numel() for p in model.parameters())
        check_model_runs(model, data)
        outcome = train_model(model, data.trial, lr, settings, data.device, progress, desc,
                              on_epoch=on_epoch, checkpoint=checkpoint, budget=budget)
        result.resumed_at = outcome.resumed_at
        if prune_fraction and outcome.stop_reason not in (STOP_DIVERGED, STOP_BUDGET):
            model, outcome = _prune_and_tune(model, outcome, prune_fraction, data, settings,
                                             progress, desc)
            result.params = sum(p.numel() for p in model.parameters())
        if settings.CALIBRATE_THRESHOLD and outcome.stop_reason != STOP_DIVERGED:
            result.threshold = calibrate(model, data, settings)       # folded into the bias
            outcome = dataclasses.replace(outcome, state_dict={
                k: v.detach().clone() for k, v in model.state_dict().items()})
        result.epochs, result.best_epoch = outcome.epochs, outcome.best_epoch
        result.stop_reason, result.history = outcome.stop_reason, outcome.history
        result.state_dict = {k: v.detach().cpu() for k, v in outcome.state_dict.items()}
        y_val = data.trial.y_val.cpu().numpy()
        scoring = Scoring.of(settings)
        result.val_metrics, result.confusion['val'], rows = evaluate(
            model, data.trial.x_val, y_val, data.val_subjects, 'val', data, scoring=scoring)
        result.per_subject = rows
        if len(data.x_test):
            result.test_metrics, result.confusion['test'], rows = evaluate(
                model, data.x_test, data.y_test, data.test_subjects, 'test', data, progress,
                scoring=scoring)
            result.per_subject += rows
        if outcome.stop_reason == STOP_DIVERGED:
            result.status = TrialStatus.DIVERGED
            result.error = 'loss became NaN/inf'
        else:
            os.makedirs(os.path.dirname(os.path.abspath(onnx_path)), exist_ok=True)
            result.onnx_bytes = export_onnx(model, onnx_path, data.in_channels,
                                            data.input_size, settings.ONNX_OPSET)
            check_onnx(onnx_path, model, data.onnx_sample)
            with open(onnx_path, 'rb') as f:
                result.onnx = f.read()
            result.graph = graph_stats(onnx_path)
            if latency:
                result.latency_ms = onnx_latency_ms(onnx_path, settings.LATENCY_RUNS)
                for metrics in (result.val_metrics, result.test_metrics):
                    add_contest_score(metrics, scoring, result.latency_ms, result.onnx_bytes,
                                      result.graph.get('macs'))
            result.status = TrialStatus.OK
            result.model = model
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        result.status = TrialStatus.FAILED
        result.error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    result.wall_s = time.perf_counter() - start
    return result


def _prune_and_tune(model, outcome, fraction, data, settings, progress, desc):
    """The pruned model, fine-tuned PRUNE_EPOCHS epochs (best validation loss kept) at the
    learning rate the base run ended with; its outcome continues the base run's history."""
    example = data.trial.x_train[:2].unsqueeze(-1)
    pruned = prune_model(model, fraction, example).to(data.device)
    if not settings.PRUNE_EPOCHS:
        return pruned, outcome
    tune = copy.copy(settings)
    tune.NUM_EPOCHS = settings.PRUNE_EPOCHS
    last_lr = outcome.history[-1][3] if outcome.history else settings.LEARNING_RATE
    fine = train_model(pruned, data.trial, last_lr, tune, data.device, progress,
                       f"{desc} pruned")
    offset = outcome.epochs
    return pruned, dataclasses.replace(
        fine, epochs=offset + fine.epochs, best_epoch=offset + fine.best_epoch,
        history=list(outcome.history) + [(offset + e, *rest) for e, *rest in fine.history])


def refit(build_model, lr, outcome, data, settings, onnx_path, progress=False, desc='refit'):
    """REFIT: a fresh seeded model trained on every training subject (train + validation)
    for the epochs validation chose (outcome.best_epoch), at the learning rates the
    validated run used in those epochs (outcome.history); scored on the test split only
    (it has seen the validation subjects), exported and checked. Returns what the result
    folder needs of it."""
    start = time.perf_counter()
    seed_everything(settings.SEED)
    model = build_model()
    if settings.NORMALIZE == 'segment':
        add_normalization(model)
    model = model.to(data.device)
    epochs = max(1, outcome.best_epoch)
    x = torch.cat([data.trial.x_train, data.trial.x_val])
    y = torch.cat([data.trial.y_train, data.trial.y_val])
    losses = train_fixed(model, x, y, refit_schedule(outcome.history, lr, epochs), settings,
                         data.device, progress, f"{desc} refit")
    info = {'epochs': epochs, 'train_loss': losses[-1] if losses else float('nan'),
            'test_metrics': {}, 'confusion': {}, 'per_subject': []}
    if not all(np.isfinite(losses)):
        raise ValueError(f"REFIT: the loss became NaN/inf retraining on all training subjects "
                         f"(epoch {len(losses)} of {epochs})")
    if len(data.x_test):
        info['test_metrics'], info['confusion']['test'], info['per_subject'] = evaluate(
            model, data.x_test, data.y_test, data.test_subjects, 'test-refit', data, progress,
            scoring=Scoring.of(settings))
    info['onnx_bytes'] = export_onnx(model, onnx_path, data.in_channels, data.input_size,
                                     settings.ONNX_OPSET)
    # latency does not depend on the weights: the validated model's figures serve
    add_contest_score(info['test_metrics'], Scoring.of(settings), outcome.latency_ms,
                      info['onnx_bytes'], (outcome.graph or {}).get('macs'))
    check_onnx(onnx_path, model, data.onnx_sample)
    with open(onnx_path, 'rb') as f:
        info['onnx'] = f.read()
    info['state_dict'] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    info['model'] = model          # for run_trial_job's QAT; dropped before the result goes back
    info['wall_s'] = time.perf_counter() - start
    return info


@dataclass
class TrialSpec:
    """What a worker needs to run one trial: sent to it whole (small, picklable)."""
    key: str                  # 'AFNet@0.0025', 'c1-f2'
    build: object             # picklable callable -> fresh model (e.g. functools.partial)
    lr: float
    settings: object
    quantize: bool = False    # stage two with QUANTIZE_INT8: add the INT8 model
    trainer: object = None    # run_trial, or a stand-in of the same signature (tests)
    progress: bool = False
    prune: float = 0.0        # stage two's pruned candidates: the fraction of channels removed
    refit_above: float = 0.0  # REFIT only a trial whose deciding score reaches this (the best
    report_to: object = None  # live progress: a callable taking events, or a queue (put_nowait)
    checkpoint: str = ''      # the trial's checkpoint file (checkpoint_path); '' for none
    budget: int = 0           # SCHEDULER='halving': the epochs of its rung in all (0: NUM_EPOCHS)


def run_trial_job(spec, data):
    """One trial as a job of an executor (in-process or a Ray worker): its files go to a
    private scratch folder that is removed afterwards; everything comes back in the result
    (metrics, state dict, ONNX bytes), for the driver to record."""
    data = on_device(data)
    settings = spec.settings
    scratch = _scratch_dir(settings.TEMP_DIR)
    try:
        onnx_path = os.path.join(scratch, 'trial.onnx')
        trainer = spec.trainer or run_trial
        reporter = _reporter(spec, trainer)
        extra = ({'on_epoch': reporter.epoch} if reporter is not None
                 and 'on_epoch' in inspect.signature(trainer).parameters else {})
        if (_checkpoint_here(spec.checkpoint)
                and 'checkpoint' in inspect.signature(trainer).parameters):
            extra['checkpoint'] = spec.checkpoint
        if spec.budget:
            extra['budget'] = spec.budget       # a trainer without budgets can't be scheduled
        result = trainer(spec.build, spec.lr, data, settings, onnx_path,
                         progress=spec.progress, desc=spec.key,
                         **({'prune_fraction': spec.prune} if spec.prune else {}), **extra)
        if result.status == TrialStatus.OK and result.onnx is None and os.path.exists(onnx_path):
            with open(onnx_path, 'rb') as f:
                result.onnx = f.read()
        if result.state_dict is not None:
            result.state_dict = {k: v.detach().cpu() for k, v in result.state_dict.items()}
        if spec.quantize:
            _after_training(result, 'INT8 quantization', _add_int8, spec, onnx_path, data)
        if spec.quantize and settings.QAT_EPOCHS:
            _after_training(result, 'quantization-aware training', _add_qat, spec, onnx_path,
                            data)
        if (settings.REFIT and not spec.prune and result.status == TrialStatus.OK
                and result.stop_reason != STOP_BUDGET        # a rung's result may go on
                and deciding_score(result, settings) >= spec.refit_above - 1e-5):   # rows hold 6 digits
            _after_training(result, 'REFIT', _add_refit, spec, onnx_path, data)
        if reporter is not None:                  # after INT8, QAT and REFIT: the whole job
            reporter.ended(result.status)
        result.model = None
        if result.refit:
            result.refit.pop('model', None)
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


CHECKPOINTS = 'checkpoints'


def checkpoint_path(temp_dir, stage_key, trial_key):
    """<TEMP_DIR>/checkpoints/<stage key>/<trial key, made a safe name>/state.pt, absolute (a
    Ray worker of a private instance runs on this machine, in another working directory).
    The stage key holds the settings key: a checkpoint of other settings is never found."""
    safe = ''.join(c if c.isalnum() or c in '.-_' else '_' for c in trial_key)
    return os.path.join(os.path.abspath(temp_dir), CHECKPOINTS, stage_key, safe, 'state.pt')


def _checkpoint_here(path):
    # A worker checkpoints only where the driver's TEMP_DIR exists: this machine (a private
    # instance), or a folder the cluster's nodes share. Elsewhere a retry starts over.
    return bool(path) and os.path.isdir(path.rsplit(os.sep + CHECKPOINTS + os.sep, 1)[0])


def remove_checkpoint(path):
    """Remove a trial's checkpoint folder (its row is committed: it will not run again)."""
    if path:
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)


def clean_checkpoints(temp_dir, stage_prefix, stage_key, finished, log):
    """At a stage's start: remove the checkpoints of this stage's other settings keys
    (folders `<stage_prefix>*` but `stage_key`; all of them with stage_key None: never
    resumed) and of trials that already have a row (`finished`: trial keys); say what is
    left to resume."""
    root = os.path.join(os.path.abspath(temp_dir), CHECKPOINTS)
    if not os.path.isdir(root):
        return
    for name in os.listdir(root):
        if name.startswith(stage_prefix) and name != stage_key:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            log(f"  removed the trial checkpoints of other settings ({name})")
    if stage_key is None:                  # RESUME=False: every trial starts over
        return
    for key in finished:
        remove_checkpoint(checkpoint_path(temp_dir, stage_key, key))
    mine = os.path.join(root, stage_key)
    left = sorted(os.listdir(mine)) if os.path.isdir(mine) else []
    if left:
        log(f"  {len(left)} trial checkpoint(s) in {mine}: those trials resume mid-training")


def _reporter(spec, trainer):
    """The trial's EpochReporter when the driver watches progress (spec.report_to: the
    driver's view in serial mode, a ray.util.queue.Queue in a Ray worker), already told the
    trial started; None when nobody watches. A stand-in trainer that takes no `on_epoch`
    still gets its start and end reported."""
    target = spec.report_to
    if target is None:
        return None
    send = target if callable(target) else target.put_nowait
    reporter = EpochReporter(spec.key, send, min_interval=0.5)
    reporter.started(min(spec.budget or spec.settings.NUM_EPOCHS, spec.settings.NUM_EPOCHS))
    return reporter


def _after_training(result, what, step, spec, float_path, data):
    """Run one step after training (INT8, QAT, REFIT) on a trial that is still ok; a step
    that raises fails the trial, the error naming the step (the search goes on)."""
    if result.status != TrialStatus.OK:
        return
    try:
        step(result, spec, float_path, data)
    except Exception as exc:
        result.status = TrialStatus.FAILED
        result.error = f"{what} failed: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"


def _scratch_dir(temp_dir):
    # Under TEMP_DIR where it can be written (a stale one, of a killed process, is removed
    # by the next run: public.results.store.clean_scratch); a worker on another machine uses its own /tmp.
    prefix = f".atml-scratch-{os.getpid()}-"
    try:
        os.makedirs(temp_dir, exist_ok=True)
        return tempfile.mkdtemp(prefix=prefix, dir=temp_dir)
    except OSError:
        return tempfile.mkdtemp(prefix=prefix)


def _add_int8(result, spec, float_path, data):
    """Quantize the trained model's ONNX and measure the INT8 model with onnxruntime."""
    result.int8, result.int8_onnx = _int8_of(float_path, data, ('val', 'test'), spec.settings)


def qat_learning_rate(lr):
    """QAT fine-tunes at a fifteenth of the training rate (1e-4 at 0.0015: the best of the
    rates bench/bench_qat.py tried)."""
    return lr / 15


def _add_qat(result, spec, float_path, data):
    """QAT_EPOCHS: fine-tune the trained model with fake quantization and make ITS INT8
    file the deliverable; the post-training INT8 figures are kept beside (int8['ptq'])."""
    settings = spec.settings
    model = result.model
    if model is None:                     # a stand-in trainer: rebuild from the weights
        model = spec.build()
        if settings.NORMALIZE == 'segment':
            add_normalization(model)
        model.load_state_dict(result.state_dict)
    qat_path = float_path + '.qat.onnx'
    ptq = {k: v for k, v in result.int8.items()}
    qat_int8(model, data.trial, qat_learning_rate(spec.lr), settings, settings.QAT_EPOCHS, calibration_sample(data),
             qat_path, data.in_channels, data.input_size, settings.ONNX_OPSET, data.device)
    measured, result.int8_onnx = _measure_int8(qat_path, data, ('val', 'test'), settings)
    result.int8 = dict(measured, method='qat', epochs=settings.QAT_EPOCHS, ptq=ptq)


def deciding_score(result, settings):
    """The score the search decides on: the INT8 model's when there is one (stage two with
    QUANTIZE_INT8), else the float model's, on SELECT_ON by SELECT_METRIC."""
    metrics = result.int8[settings.SELECT_ON] if result.int8 else result.selected(settings.SELECT_ON)
    return selection_score(metrics, settings.SELECT_METRIC) if metrics else 0.0


def _add_refit(result, spec, float_path, data):
    """REFIT the trial (refit()), then make the refit model's INT8 file as the validated
    model's was made (post-training, or QAT), measured on the test split."""
    settings = spec.settings
    path = float_path + '.refit.onnx'
    result.refit = refit(spec.build, spec.lr, result, data, settings, path, spec.progress,
                         spec.key)
    if not spec.quantize:
        return
    result.refit['int8'], result.refit['int8_onnx'] = _int8_of(path, data, ('test',), settings)
    if settings.QAT_EPOCHS:
        qat_int8(result.refit['model'], data.trial, qat_learning_rate(spec.lr), settings,
                 settings.QAT_EPOCHS, calibration_sample(data), path + '.qat', data.in_channels,
                 data.input_size, settings.ONNX_OPSET, data.device)
        measured, result.refit['int8_onnx'] = _measure_int8(path + '.qat', data, ('test',),
                                                            settings)
        result.refit['int8'] = dict(measured, method='qat', ptq=result.refit['int8'])


def _measure_int8(int8_path, data, splits, settings):
    # The INT8 file's own latency and graph figures: the contest score and the deployment
    # columns of an INT8 stage two are the deliverable's.
    scoring = Scoring.of(settings)
    measured = {'bytes': os.path.getsize(int8_path),
                'latency_ms': onnx_latency_ms(int8_path, settings.LATENCY_RUNS),
                'graph': graph_stats(int8_path)}
    for split, x, y, subjects in (
            ('val', data.trial.x_val, data.trial.y_val.cpu().numpy(), data.val_subjects),
            ('test', data.x_test, data.y_test, data.test_subjects)):
        if split in splits and len(x):
            probs = probabilities(onnx_predict(int8_path, x.cpu().numpy()), data.multilabel)
            measured[split] = add_contest_score(
                classification_metrics(y, probs, data.num_classes, data.class_names or None,
                                       subjects, scoring),
                scoring, measured['latency_ms'], measured['bytes'], measured['graph'].get('macs'))
        else:
            measured[split] = {}
    with open(int8_path, 'rb') as f:
        return measured, f.read()


def _int8_of(float_path, data, splits, settings):
    int8_path = float_path + '.int8.onnx'
    quantize_int8(float_path, int8_path, calibration_sample(data),
                  reduce_range=settings.INT8_REDUCE_RANGE)
    return _measure_int8(int8_path, data, splits, settings)


def outcome_result(outcome):
    """The TrialResult of an executor's Outcome (a failed job becomes a failed result)."""
    result = outcome.result if outcome.ok else TrialResult(status=TrialStatus.FAILED,
                                                           error=outcome.error)
    result.node, result.attempts = outcome.node, outcome.attempts
    return result


def drop_unneeded_refit(result, settings, bar):
    """REFIT is decided at dispatch against the best score then recorded; a trial started
    ahead of the serial order may see a lower bar than the serial search would. Undo a refit
    the serial search would not have made (its score is below the bar at commit time), so
    the row and the files are the serial search's."""
    if getattr(result, 'refit', None) and deciding_score(result, settings) < bar - 1e-5:
        result.refit = None
