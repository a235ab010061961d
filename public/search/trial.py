"""One trial, the unit both stages are made of: build, train, evaluate, export, check.

    data = prepare_data(settings)                         # parse/cache, split, to device
    result = run_trial(lambda: AFNet(...), lr, data, settings, onnx_path)

A trial that fails (the model does not build or run on the input shape, the loss turns
NaN, export fails) comes back as a TrialResult with status 'failed' or 'diverged' and the
traceback, never as an exception: a failed candidate is not a failed run. Only an
interruption (KeyboardInterrupt) propagates.
"""
import dataclasses
import os
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, field

import numpy as np
import torch

from public.dataset import (DataError, encode_labels, load_data, num_classes,
                            split_by_folds, split_by_subject)
from public.export import check_onnx, export_onnx, onnx_latency_ms
from public.test import classification_metrics, predict_proba, probabilities
from public.recipe import add_normalization
from public.training import STOP_DIVERGED, TrialData, seed_everything, train_model

STATUS_OK, STATUS_DIVERGED, STATUS_FAILED = 'ok', 'diverged', 'failed'
# A trial the parallel search ran ahead of the serial order and the serial search never
# reaches (pruned by an earlier result, its model done): its row is kept, it decides nothing.
STATUS_SPECULATIVE = 'speculative'


@dataclass
class PreparedData:
    """Everything a trial needs, loaded once per run."""
    trial: TrialData
    x_test: torch.Tensor      # (N, C, L) on CPU; empty when there is no test folder
    y_test: np.ndarray
    onnx_sample: np.ndarray   # real validation segments for the ONNX-vs-PyTorch check
    in_channels: int
    input_size: int
    num_classes: int
    device: torch.device
    summary: str
    val_subjects: np.ndarray = None    # subject of each validation / test segment
    test_subjects: np.ndarray = None   # (for per_subject.csv); None when not known
    multilabel: bool = False           # LABEL_MODE='multilabel': y is (N, K) multi-hot
    class_names: tuple = ()            # CLASSES as text (per-label metric names)


def choose_device(name):
    if name == 'cuda' and not torch.cuda.is_available():
        from public.config import SettingsError
        raise SettingsError("params.py: DEVICE='cuda' but torch sees no CUDA device on this "
                            "machine; use DEVICE='auto' or 'cpu'")
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    return torch.device(name)


def prepare_data(settings, progress=True):
    """Load (parse once / from cache) the training and test folders, split by subject."""
    device = choose_device(settings.DEVICE)
    if settings.NUM_THREADS:
        torch.set_num_threads(settings.NUM_THREADS)
    train = load_data(settings.DATA_DIR, settings, progress=progress)
    if not train.has_labels:
        raise DataError(f"{settings.DATA_DIR}: training data has no labels")
    y = encode_labels(train, settings, settings.DATA_DIR)
    if settings.VAL_FOLDS:
        train_idx, val_idx = split_by_folds(train.folds, settings.VAL_FOLDS, settings.DATA_DIR)
    else:
        train_idx, val_idx = split_by_subject(train.subjects, y, settings.VAL_FRACTION,
                                              settings.SEED, source=settings.DATA_DIR)
    multilabel = getattr(settings, 'LABEL_MODE', 'multiclass') == 'multilabel'
    if multilabel:
        y = np.asarray(y, dtype=np.float32)
        absent = [str(c) for c, n in zip(settings.CLASSES, y[train_idx].sum(0)) if n == 0]
        if absent:
            raise DataError(f"{settings.DATA_DIR}: label(s) {absent} of CLASSES="
                            f"{settings.CLASSES!r} are on no training segment; a label the "
                            f"model never sees positive cannot be learnt (drop it from CLASSES)")
    missing = ([] if multilabel else
               sorted(set(range(num_classes(settings))) - set(np.unique(y).tolist())))
    if missing:
        found = sorted(set(train.rhythms.tolist()))
        rule = (f"CLASSES={settings.CLASSES!r}" if settings.CLASSES
                else f"POSITIVE_LABELS={settings.POSITIVE_LABELS!r} (class 1) vs the rest (class 0)")
        raise DataError(f"{settings.DATA_DIR}: class(es) {missing} have no training segment "
                        f"under {rule}; labels found: {found[:20]}. Set POSITIVE_LABELS to the "
                        f"positive label (e.g. ('1',)) or CLASSES to the labels in order")
    x = train.x           # may be a read-only memory map of the cache; indexing copies
    trial = TrialData(x_train=torch.from_numpy(x[train_idx]).to(device),
                      y_train=torch.from_numpy(y[train_idx]).to(device),
                      x_val=torch.from_numpy(x[val_idx]).to(device),
                      y_val=torch.from_numpy(y[val_idx]).to(device))
    lines = [f"train folder {settings.DATA_DIR}: {len(train)} segments "
             f"({'from cache' if train.from_cache else 'parsed'}), "
             f"{len(np.unique(train.subjects[train_idx]))} subjects train / "
             f"{len(np.unique(train.subjects[val_idx]))} validate; "
             f"{len(train_idx)} / {len(val_idx)} segments, {x.shape[1]} lead(s), "
             f"{_class_mix(y[train_idx], settings)} / {_class_mix(y[val_idx], settings)}"]
    lines += _warnings(train, settings.DATA_DIR)
    x_test = torch.zeros((0,) + tuple(x.shape[1:]))
    y_test = (np.zeros((0, len(settings.CLASSES)), np.float32) if multilabel
              else np.zeros(0, np.int64))
    test_subjects = np.zeros(0, str)
    if settings.TEST_DIR:
        test = load_data(settings.TEST_DIR, settings, progress=progress)
        if test.x.shape[1] != x.shape[1]:
            raise DataError(f"{settings.TEST_DIR}: segments have {test.x.shape[1]} leads, "
                            f"the training data's have {x.shape[1]}")
        if not test.has_labels:
            raise DataError(f"{settings.TEST_DIR}: test data has no labels, so it cannot be "
                            f"evaluated; set TEST_DIR='' and use predict.py for unlabelled data")
        x_test = torch.from_numpy(np.array(test.x))
        y_test = encode_labels(test, settings, settings.TEST_DIR)
        if multilabel:
            y_test = np.asarray(y_test, dtype=np.float32)
        test_subjects = np.asarray(test.subjects)
        lines.append(f"test data {settings.TEST_DIR}: {len(test)} segments, "
                     f"{len(np.unique(test.subjects))} subjects, {_class_mix(y_test, settings)}")
        lines += _warnings(test, settings.TEST_DIR)
        lines += _shared_subjects(train, test, settings)
    lines.append(f"device: {device}")
    return PreparedData(trial=trial, x_test=x_test, y_test=y_test,
                        onnx_sample=np.asarray(train.x[val_idx[:32]]), in_channels=x.shape[1],
                        input_size=settings.INPUT_SIZE, num_classes=num_classes(settings),
                        device=device, summary='\n'.join(lines),
                        val_subjects=np.asarray(train.subjects[val_idx]),
                        test_subjects=test_subjects, multilabel=multilabel,
                        class_names=tuple(str(c) for c in settings.CLASSES))


def _shared_subjects(train, test, settings):
    if any(np.array_equal(np.asarray(d.subjects), np.asarray(d.names)) for d in (train, test)):
        return []            # no subject column: the ids stand in for subjects, not patients
    shared = sorted(set(np.unique(train.subjects).tolist()) & set(np.unique(test.subjects).tolist()))
    if not shared:
        return []
    return [f"warning: {len(shared)} subject(s) of TEST_DIR={settings.TEST_DIR!r} are also in "
            f"DATA_DIR={settings.DATA_DIR!r} ({', '.join(map(str, shared[:5]))}"
            f"{', ...' if len(shared) > 5 else ''}): test metrics on seen patients overstate "
            f"how the model does on new ones"]


def _class_mix(y, settings):
    if np.ndim(y) == 2:
        return 'labels ' + ' '.join(f"{c}:{int(n)}" for c, n in zip(settings.CLASSES, y.sum(0)))
    if not settings.CLASSES:
        return f"AF {y.mean():.0%}" if len(y) else 'empty'
    counts = np.bincount(y, minlength=len(settings.CLASSES))
    return 'classes ' + ' '.join(f"{c}:{n}" for c, n in zip(settings.CLASSES, counts))


def _warnings(segments, source):
    lines = []
    if segments.skipped:
        lines.append(f"warning: skipped {len(segments.skipped)} bad file(s) in {source} "
                     f"(SKIP_BAD_FILES=True); first: {segments.skipped[0][1]}")
    if segments.excluded:
        lines.append(f"warning: excluded {len(segments.excluded)} segment(s) of {source} shorter "
                     f"than INPUT_SIZE - PAD_TOLERANCE; first: {segments.excluded[0][0]} "
                     f"({segments.excluded[0][1]})")
    return lines


@dataclass
class TrialResult:
    status: str
    stop_reason: str = ''
    epochs: int = 0
    best_epoch: int = 0
    val_metrics: dict = field(default_factory=dict)
    test_metrics: dict = field(default_factory=dict)
    onnx_bytes: int = 0
    latency_ms: float = float('nan')
    params: int = 0
    wall_s: float = 0.0
    error: str = ''
    state_dict: dict = None   # best-validation weights, on the CPU
    onnx: bytes = None        # the exported, checked ONNX file's bytes
    history: list = field(default_factory=list)   # (epoch, train_loss, val_loss, lr)
    confusion: dict = field(default_factory=dict)  # {'val': [[...]], 'test': [[...]]}
    int8: dict = None         # stage two with QUANTIZE_INT8: bytes, val and test metrics
    int8_onnx: bytes = None
    per_subject: list = field(default_factory=list)   # rows of per_subject.csv
    refit: dict = None        # REFIT: the model retrained on train + validation (see refit())
    model: object = None      # the trained model (CPU), for run_job's QAT; never sent back
    node: str = ''            # where it ran ('local', or the Ray node id)
    attempts: int = 1

    def selected(self, select_on):
        return self.val_metrics if select_on == 'val' else self.test_metrics


def check_model_runs(model, data):
    """Forward a batch of 2 real-shaped inputs; raise with a clear message if it cannot."""
    x = data.trial.x_train[:2].unsqueeze(-1)
    out = model(x)
    if tuple(out.shape) != (len(x), data.num_classes):
        raise ValueError(f"model output has shape {tuple(out.shape)} for input "
                         f"{tuple(x.shape)}; expected ({len(x)}, {data.num_classes})")


def run_trial(build_model, lr, data, settings, onnx_path, progress=True, desc='train',
              latency=True, prune_fraction=0.0):
    """Build a fresh seeded model, train, evaluate on val and test, export and check ONNX.
    With prune_fraction, the trained model then loses that fraction of its channels and
    hidden units (smallest L1 norm first, public/prune.py) and is fine-tuned PRUNE_EPOCHS."""
    start = time.perf_counter()
    result = TrialResult(status=STATUS_FAILED)
    try:
        seed_everything(settings.SEED)
        model = build_model()
        if getattr(settings, 'NORMALIZE', 'none') == 'segment':
            add_normalization(model)
        model = model.to(data.device)
        result.params = sum(p.numel() for p in model.parameters())
        check_model_runs(model, data)
        outcome = train_model(model, data.trial, lr, settings, data.device, progress, desc)
        if prune_fraction and outcome.stop_reason != STOP_DIVERGED:
            model, outcome = _prune_and_tune(model, outcome, prune_fraction, data, settings,
                                             progress, desc)
            result.params = sum(p.numel() for p in model.parameters())
        result.epochs, result.best_epoch = outcome.epochs, outcome.best_epoch
        result.stop_reason, result.history = outcome.stop_reason, outcome.history
        result.state_dict = {k: v.detach().cpu() for k, v in outcome.state_dict.items()}
        y_val = data.trial.y_val.cpu().numpy()
        result.val_metrics, result.confusion['val'], rows = evaluate(
            model, data.trial.x_val, y_val, data.val_subjects, 'val', data)
        result.per_subject = rows
        if len(data.x_test):
            result.test_metrics, result.confusion['test'], rows = evaluate(
                model, data.x_test, data.y_test, data.test_subjects, 'test', data, progress)
            result.per_subject += rows
        if outcome.stop_reason == STOP_DIVERGED:
            result.status = STATUS_DIVERGED
            result.error = 'loss became NaN/inf'
        else:
            os.makedirs(os.path.dirname(os.path.abspath(onnx_path)), exist_ok=True)
            result.onnx_bytes = export_onnx(model, onnx_path, data.in_channels,
                                            data.input_size, settings.ONNX_OPSET)
            check_onnx(onnx_path, model, data.onnx_sample)
            with open(onnx_path, 'rb') as f:
                result.onnx = f.read()
            if latency:
                result.latency_ms = onnx_latency_ms(onnx_path, settings.LATENCY_RUNS)
            result.status = STATUS_OK
            result.model = model
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        result.status = STATUS_FAILED
        result.error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    result.wall_s = time.perf_counter() - start
    return result


def _prune_and_tune(model, outcome, fraction, data, settings, progress, desc):
    """The pruned model, fine-tuned PRUNE_EPOCHS epochs (best validation loss kept) at the
    learning rate the base run ended with; its outcome continues the base run's history."""
    import copy
    from public.prune import prune_model
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


def evaluate(model, x, y, subjects, split, data, progress=False):
    """(metrics, confusion matrix, per-subject rows) of model on one labelled split."""
    probs = predict_proba(model, x, data.device, progress=progress, desc=split,
                          multilabel=data.multilabel)
    metrics = classification_metrics(y, probs, data.num_classes, data.class_names or None)
    return (metrics, _confusion(y, probs, data.num_classes),
            per_subject(split, subjects, y, probs, data.num_classes))


def refit(build_model, lr, outcome, data, settings, onnx_path, progress=False, desc='refit'):
    """REFIT: a fresh seeded model trained on every training subject (train + validation)
    for the epochs validation chose (outcome.best_epoch), at the learning rates the
    validated run used in those epochs (outcome.history); scored on the test split only
    (it has seen the validation subjects), exported and checked. Returns what the result
    folder needs of it."""
    start = time.perf_counter()
    from public.training import refit_schedule, train_fixed
    seed_everything(settings.SEED)
    model = build_model()
    if getattr(settings, 'NORMALIZE', 'none') == 'segment':
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
            model, data.x_test, data.y_test, data.test_subjects, 'test-refit', data, progress)
    info['onnx_bytes'] = export_onnx(model, onnx_path, data.in_channels, data.input_size,
                                     settings.ONNX_OPSET)
    check_onnx(onnx_path, model, data.onnx_sample)
    with open(onnx_path, 'rb') as f:
        info['onnx'] = f.read()
    info['state_dict'] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    info['model'] = model          # for run_job's QAT; dropped before the result goes back
    info['wall_s'] = time.perf_counter() - start
    return info


PER_SUBJECT_COLUMNS = ('split', 'subject', 'segments', 'class_mix', 'f1', 'accuracy',
                       'recall', 'precision')


def per_subject(split, subjects, y_true, probs, num_classes):
    """Where the model fails: the metrics of each subject's segments (rows of per_subject.csv)."""
    if subjects is None or len(subjects) != len(y_true):
        return []
    from public.test import binary_metrics
    y_true, pred = np.asarray(y_true), np.asarray(probs).argmax(1)
    rows = []
    for subject in np.unique(subjects):
        mask = np.asarray(subjects) == subject
        if y_true.ndim == 2:       # multi-label: positives per label; macro metrics
            counts = y_true[mask].sum(0).astype(np.int64)
            m = classification_metrics(y_true[mask], np.asarray(probs)[mask])
        elif num_classes == 2:
            counts = np.bincount(y_true[mask], minlength=num_classes)
            m = binary_metrics(y_true[mask], pred[mask])
        else:
            counts = np.bincount(y_true[mask], minlength=num_classes)
            m = classification_metrics(y_true[mask], np.asarray(probs)[mask], num_classes)
        rows.append(dict(split=split, subject=str(subject), segments=int(mask.sum()),
                         class_mix=' '.join(f"{c}:{n}" for c, n in enumerate(counts.tolist())),
                         **{k: round(float(m[k]), 4) for k in ('f1', 'accuracy', 'recall',
                                                               'precision')}))
    return rows


def worst_subjects(rows, split, count=3):
    """The subjects with the lowest accuracy on a split: 'S12 (acc 0.41, 80 segments)'."""
    mine = sorted((r for r in rows if r['split'] == split), key=lambda r: float(r['accuracy']))
    return [f"{r['subject']} (accuracy {float(r['accuracy']):.2f}, {r['segments']} segments)"
            for r in mine[:count]]


def _confusion(y_true, probs, num_classes):
    """Rows: true class, columns: predicted class (counts). Multi-label: one 2x2 matrix per
    label (rows: label absent/present; columns: predicted absent/present, at 0.5)."""
    if np.ndim(y_true) == 2:
        truth, pred = np.asarray(y_true) > 0.5, np.asarray(probs) >= 0.5
        return [[[int((~t & ~p).sum()), int((~t & p).sum())], [int((t & ~p).sum()),
                                                               int((t & p).sum())]]
                for t, p in zip(truth.T, pred.T)]
    pred = np.asarray(probs).argmax(1) if len(probs) else np.zeros(0, np.int64)
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (np.asarray(y_true, np.int64), pred), 1)
    return matrix.tolist()


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
                              # recorded when it was dispatched): the others cannot be delivered


_ON_DEVICE = {}     # per process: id(shared data) -> (data, its copy with tensors on data.device)


def on_device(data):
    """`data` with its training tensors on data.device. A Ray worker receives them on the
    CPU (from the object store); with DEVICE='cuda' they are moved once per worker process."""
    if data.trial.x_train.device == data.device:
        return data
    cached = _ON_DEVICE.get(id(data))
    if cached is None or cached[0] is not data:
        trial = TrialData(**{k: getattr(data.trial, k).to(data.device)
                             for k in ('x_train', 'y_train', 'x_val', 'y_val')})
        cached = _ON_DEVICE[id(data)] = (data, dataclasses.replace(data, trial=trial))
    return cached[1]


def run_job(spec, data):
    """One trial as a job of an executor (in-process or a Ray worker): its files go to a
    private scratch folder that is removed afterwards; everything comes back in the result
    (metrics, state dict, ONNX bytes), for the driver to record."""
    data = on_device(data)
    scratch = _scratch_dir(spec.settings.TEMP_DIR)
    try:
        onnx_path = os.path.join(scratch, 'trial.onnx')
        trainer = spec.trainer or run_trial
        result = trainer(spec.build, spec.lr, data, spec.settings, onnx_path,
                         progress=spec.progress, desc=spec.key,
                         **({'prune_fraction': spec.prune} if spec.prune else {}))
        if result.status == STATUS_OK and result.onnx is None and os.path.exists(onnx_path):
            with open(onnx_path, 'rb') as f:
                result.onnx = f.read()
        if result.state_dict is not None:
            result.state_dict = {k: v.detach().cpu() for k, v in result.state_dict.items()}
        if result.status == STATUS_OK and spec.quantize:
            try:
                _add_int8(result, onnx_path, data, spec.settings)
            except Exception as exc:
                result.status = STATUS_FAILED
                result.error = f"INT8 quantization failed: {type(exc).__name__}: {exc}"
        if result.status == STATUS_OK and spec.quantize and spec.settings.QAT_EPOCHS:
            try:
                _add_qat(result, spec, onnx_path, data)
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                result.status = STATUS_FAILED
                result.error = (f"quantization-aware training failed: {type(exc).__name__}: "
                                f"{exc}\n{traceback.format_exc()}")
        if (result.status == STATUS_OK and getattr(spec.settings, 'REFIT', False)
                and not spec.prune
                and deciding_score(result, spec.settings) >= spec.refit_above - 1e-5):   # rows hold 6 digits
            try:
                _add_refit(result, spec, onnx_path, data)
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                result.status = STATUS_FAILED
                result.error = f"REFIT failed: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        result.model = None
        if result.refit:
            result.refit.pop('model', None)
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _scratch_dir(temp_dir):
    # Under TEMP_DIR where it can be written (a stale one, of a killed process, is removed
    # by the next run: results.clean_scratch); a worker on another machine uses its own /tmp.
    prefix = f".atml-scratch-{os.getpid()}-"
    try:
        os.makedirs(temp_dir, exist_ok=True)
        return tempfile.mkdtemp(prefix=prefix, dir=temp_dir)
    except OSError:
        return tempfile.mkdtemp(prefix=prefix)


def calibration_sample(data, count=256):
    """A seeded sample of training segments that fixes INT8 activation ranges."""
    x = data.trial.x_train
    idx = np.random.default_rng(0).permutation(len(x))[:count]
    return x[torch.as_tensor(idx)].cpu().numpy()


def _add_int8(result, float_path, data, settings):
    """Quantize the trained model's ONNX and measure the INT8 model with onnxruntime."""
    result.int8, result.int8_onnx = _int8_of(float_path, data, ('val', 'test'), settings)
    return result


def qat_learning_rate(lr):
    """QAT fine-tunes at a fifteenth of the training rate (1e-4 at 0.0015: the best of the
    rates bench/bench_qat.py tried)."""
    return lr / 15


def _add_qat(result, spec, float_path, data):
    """QAT_EPOCHS: fine-tune the trained model with fake quantization and make ITS INT8
    file the deliverable; the post-training INT8 figures are kept beside (int8['ptq'])."""
    from public.qat import qat_int8
    settings = spec.settings
    model = result.model
    if model is None:                     # a stand-in trainer: rebuild from the weights
        model = spec.build()
        if getattr(settings, 'NORMALIZE', 'none') == 'segment':
            add_normalization(model)
        model.load_state_dict(result.state_dict)
    qat_path = float_path + '.qat.onnx'
    ptq = {k: v for k, v in result.int8.items()}
    qat_int8(model, data.trial, qat_learning_rate(spec.lr), settings, settings.QAT_EPOCHS, calibration_sample(data),
             qat_path, data.in_channels, data.input_size, settings.ONNX_OPSET, data.device)
    measured, result.int8_onnx = _measure_int8(qat_path, data, ('val', 'test'))
    result.int8 = dict(measured, method='qat', epochs=settings.QAT_EPOCHS, ptq=ptq)


def deciding_score(result, settings):
    """The score the search decides on: the INT8 model's when there is one (stage two with
    QUANTIZE_INT8), else the float model's, on SELECT_ON by SELECT_METRIC."""
    from public.test import selection_score
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
        from public.qat import qat_int8
        qat_int8(result.refit['model'], data.trial, qat_learning_rate(spec.lr), settings,
                 settings.QAT_EPOCHS, calibration_sample(data), path + '.qat', data.in_channels,
                 data.input_size, settings.ONNX_OPSET, data.device)
        measured, result.refit['int8_onnx'] = _measure_int8(path + '.qat', data, ('test',))
        result.refit['int8'] = dict(measured, method='qat', ptq=result.refit['int8'])


def _measure_int8(int8_path, data, splits):
    from public.export import onnx_predict
    measured = {'bytes': os.path.getsize(int8_path)}
    for split, x, y in (('val', data.trial.x_val, data.trial.y_val.cpu().numpy()),
                        ('test', data.x_test, data.y_test)):
        if split in splits and len(x):
            probs = probabilities(onnx_predict(int8_path, x.cpu().numpy()), data.multilabel)
            measured[split] = classification_metrics(y, probs, data.num_classes,
                                                     data.class_names or None)
        else:
            measured[split] = {}
    with open(int8_path, 'rb') as f:
        return measured, f.read()


def _int8_of(float_path, data, splits, settings):
    from public.quantize import quantize_int8
    int8_path = float_path + '.int8.onnx'
    quantize_int8(float_path, int8_path, calibration_sample(data),
                  reduce_range=settings.INT8_REDUCE_RANGE)
    return _measure_int8(int8_path, data, splits)
