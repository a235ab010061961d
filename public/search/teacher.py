"""The teacher of knowledge distillation (DISTILL_FROM): a stage-one result's logits on the
training segments, computed once per run with onnxruntime, cached on disk, and attached to
the data the trials train on.

    attach_teacher(settings, data, log)            # both stages, before their first trial
    path = teacher_onnx(settings)                  # None when DISTILL_FROM=''
    logits, teacher_id, note = teacher_logits(settings, x_train, num_classes)

The teacher is a result folder's `saved.onnx` (multi-result/<Model>/<xx>-<yy>/), or with
DISTILL_FROM='auto' the folder of stage one's recommended pick in MODEL_SAVE_PATH/summary.csv
(the best score over models, ties to the smaller ONNX: public.search.stage_one). Its logits
on the (un-augmented) training segments are cached under CACHE_DIR/teacher/, keyed by the
ONNX file's SHA-256 and the training tensor's fingerprint (shape and SHA-256 of its bytes),
so a rerun, and every trial of a run, reads them instead of running the teacher again. The
loss is public/train/distill.py's.
"""
import io
import os

import numpy as np
import torch

from public.compress.export import onnx_predict
from public.core.atomic import write_atomic
from public.core.errors import SettingsError
from public.core.settings import source_of
from public.results.keys import sha256_of
from public.results.summary import SUMMARY_CSV, teacher_folder

TEACHER_FILE = 'saved.onnx'
CACHE_FOLDER = 'teacher'
RULE = ("DISTILL_FROM must be '' (no distillation), 'auto' (the best folder of "
        "MODEL_SAVE_PATH's summary.csv) or a stage-one result folder holding saved.onnx")


def attach_teacher(settings, data, log):
    """DISTILL_FROM: put the teacher's logits on data.trial (aligned with x_train, on the
    data's device) and say where they came from; nothing when it is ''."""
    if not settings.DISTILL_FROM or data.trial.teacher_logits is not None:
        return
    logits, data.trial.teacher_id, note = teacher_logits(settings, data.trial.x_train,
                                                         data.num_classes)
    data.trial.teacher_logits = logits.to(data.trial.x_train.device)
    log(note)


def _source(settings, name='DISTILL_FROM'):
    try:
        return source_of(settings, name)
    except (AttributeError, KeyError):        # settings made in code, not loaded from a file
        return 'params.py'


def teacher_onnx(settings):
    """The teacher's ONNX file of DISTILL_FROM (None when it is ''); a SettingsError naming
    the setting, its value and the rule when there is none."""
    value = settings.DISTILL_FROM
    if not value:
        return None
    where = _source(settings)
    folder = teacher_folder(settings)
    if folder is None:
        summary = os.path.join(settings.MODEL_SAVE_PATH, SUMMARY_CSV)
        raise SettingsError(f"{where}: DISTILL_FROM='auto' takes the best stage-one result "
                            f"of {summary}, but it lists no trained model (run "
                            f"train_multi.py first); {RULE}")
    if not os.path.isdir(folder):
        raise SettingsError(f"{where}: DISTILL_FROM={value!r}: folder {folder!r} not found; "
                            f"{RULE}")
    path = os.path.join(folder, TEACHER_FILE)
    if not os.path.isfile(path):
        raise SettingsError(f"{where}: DISTILL_FROM={value!r}: folder {folder!r} has no "
                            f"{TEACHER_FILE}; {RULE}")
    return path


_sha256 = sha256_of             # the teacher file's and the data's digests


def data_fingerprint(x):
    """The fingerprint of training segments ((N, C, L) float32): shape and bytes."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    return _sha256(repr(x.shape).encode() + memoryview(x).cast('B').tobytes())


def cache_path(settings, onnx_sha, data_sha):
    return os.path.join(settings.CACHE_DIR, CACHE_FOLDER, f"{onnx_sha[:20]}-{data_sha[:20]}.npy")


def teacher_logits(settings, x_train, num_classes):
    """(logits float32 tensor (N, num_classes) on the CPU aligned with x_train, the teacher's
    id (its ONNX SHA-256), a line for the run's log); (None, '', '') when DISTILL_FROM=''.
    Read from the cache when it holds them, else computed with onnxruntime and cached."""
    path = teacher_onnx(settings)
    if path is None:
        return None, '', ''
    where = _source(settings)
    value = settings.DISTILL_FROM
    if settings.LABEL_MODE == 'multilabel':
        raise SettingsError(f"{where}: DISTILL_FROM={value!r} distils one label per segment "
                            f"(softmax KL); LABEL_MODE='multilabel' is not supported; set "
                            f"DISTILL_FROM=''")
    x = np.asarray(x_train.cpu().numpy() if torch.is_tensor(x_train) else x_train, np.float32)
    onnx_sha, data_sha = _sha256(path), data_fingerprint(x)
    cached = cache_path(settings, onnx_sha, data_sha)
    logits, how = None, 'from cache'
    if os.path.isfile(cached):
        try:
            logits = np.load(cached)
        except (OSError, ValueError):
            logits = None
        if logits is not None and logits.shape != (len(x), num_classes):
            logits = None
    if logits is None:
        try:
            logits = np.asarray(onnx_predict(path, x), np.float32)
        except Exception as exc:
            raise SettingsError(f"{where}: DISTILL_FROM={value!r}: the teacher {path} cannot "
                                f"run on the training segments (shape {x.shape[1:]} per "
                                f"segment): {type(exc).__name__}: {exc}; {RULE} trained on "
                                f"data of this shape") from exc
        if logits.ndim != 2 or logits.shape[1] != num_classes:
            raise SettingsError(f"{where}: DISTILL_FROM={value!r}: the teacher {path} gives "
                                f"outputs of shape {logits.shape[1:]} per segment, this task "
                                f"has {num_classes} classes; the teacher must be a result of "
                                f"the same task (one logit per class)")
        if not np.all(np.isfinite(logits)):
            raise SettingsError(f"{where}: DISTILL_FROM={value!r}: the teacher {path} gives "
                                f"NaN/inf logits on the training segments")
        _write_cache(cached, logits)
        how = 'computed'
    note = (f"distillation: teacher {path} (logits {how}, {os.path.basename(cached)}), "
            f"DISTILL_TEMPERATURE={settings.DISTILL_TEMPERATURE}, "
            f"DISTILL_WEIGHT={settings.DISTILL_WEIGHT}")
    return torch.from_numpy(np.ascontiguousarray(logits)), onnx_sha, note


def _write_cache(path, logits):
    buffer = io.BytesIO()
    np.save(buffer, logits)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_atomic(path, buffer.getvalue(), step=False)
    except OSError:
        pass             # a read-only cache: the logits are used, just not kept
