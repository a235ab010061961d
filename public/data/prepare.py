"""A run's data, prepared once: loaded (parsed or from the cache), split by subject, the
training tensors on the device, a summary for the log.

    data = prepare_data(settings)             # PreparedData: data.trial (TrialData), x_test, ...
    data = on_device(data)                    # in a Ray worker: the tensors moved once
    x = calibration_sample(data)              # the segments that fix INT8 activation ranges
"""
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from public.core.errors import SettingsError
from public.data.loading import (DataError, encode_labels, load_data, num_classes,
                                 split_by_folds, split_by_subject)


@dataclass
class TrialData:
    """Tensors of one trial, on the training device: x is (N, C, L), y is (N,)."""
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    teacher_logits: torch.Tensor = None   # DISTILL_FROM: the teacher's (N, K) logits on x_train
    teacher_id: str = ''                  # ... and its ONNX file's SHA-256 (public/search/teacher.py)


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
    """The torch device of DEVICE ('auto': CUDA when torch sees it, else the CPU)."""
    if name == 'cuda' and not torch.cuda.is_available():
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
    multilabel = settings.LABEL_MODE == 'multilabel'
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


_ON_DEVICE = {}     # per process: id(shared data) -> (data, its copy with tensors on data.device)


def on_device(data):
    """`data` with its training tensors on data.device. A Ray worker receives them on the
    CPU (from the object store); with DEVICE='cuda' they are moved once per worker process."""
    if data.trial.x_train.device == data.device:
        return data
    cached = _ON_DEVICE.get(id(data))
    if cached is None or cached[0] is not data:
        trial = dataclasses.replace(data.trial, **{
            k: getattr(data.trial, k).to(data.device)
            for k in ('x_train', 'y_train', 'x_val', 'y_val', 'teacher_logits')
            if getattr(data.trial, k) is not None})
        cached = _ON_DEVICE[id(data)] = (data, dataclasses.replace(data, trial=trial))
    return cached[1]


def calibration_sample(data, count=256):
    """A seeded sample of training segments that fixes INT8 activation ranges."""
    x = data.trial.x_train
    idx = np.random.default_rng(0).permutation(len(x))[:count]
    return x[torch.as_tensor(idx)].cpu().numpy()
