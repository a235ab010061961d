"""Loading: the entry of the data path. Picks the loader of a data path, encodes its
labels, splits it for validation.

    segments = load_data('ttdata/train', settings)            # any format, parsed once, cached
    y = encode_labels(segments, settings, 'ttdata/train')     # int64 (N,), or float32 (N, K)
    train_idx, val_idx = split_by_subject(segments.subjects, y, 0.2, seed=42)

Which module holds what (one direction: this module -> loaders -> public.data.segments):

    public/data/segments.py      Segments, LengthPolicy, LabelSpec, LoadOptions, excerpt,
                                 LOAD_ERRORS and the parse cache (cache_entry, checksums,
                                 load_cached, save_cached); imports no other data module
    public/data/txt_format.py    a folder of S<subject>-<RHYTHM>-<index>.txt files (load_folder)
    public/data/csv_format.py    a CSV, one segment per row (load_csv)
    public/data/numpy_format.py  a .npz / .npy file (load_numpy)
    public/data/loading.py       this module: LOADERS, detect_format, load_data, encode_labels,
                                 split_by_subject, split_by_folds, num_classes, length_policy
    public/data/prepare.py       a run's data: loaded, split and on the device (prepare_data)
    public/dataset.py            the face users import from: this module's API re-exported

A loader module imports public.data.segments only, never this module (tests/test_dataset.py
checks it), and exposes `load(path, options) -> Segments`. To add a format: write
`public/data/<name>_format.py` with such a `load`, add one line to LOADERS below (its name,
file endings and how messages describe it) and allow the name in DATA_FORMAT's rule
(public/core/settings.py).

Labels stay text in Segments.rhythms until encode_labels: binary (POSITIVE_LABELS), one of
CLASSES (LABEL_MODE='multiclass'), or a set of CLASSES joined with LABEL_SEPARATOR, e.g.
'NORM|MI' (LABEL_MODE='multilabel': a CSV label column or an .npz y of shape (N, K)).
"""
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from public.data import csv_format, numpy_format, txt_format
from public.data.segments import DataError, LabelSpec, LengthPolicy, LoadOptions


@dataclass(frozen=True)
class Loader:
    """One data format: its loader's load(path, options), the file endings detect_format
    recognises (() = a folder) and how a message names such a source."""
    load: Callable
    suffixes: tuple
    described: str


# DATA_FORMAT name -> its loader; detect_format tries them in this order.
LOADERS = {
    'txt': Loader(txt_format.load, (), 'a folder of .txt files'),
    'csv': Loader(csv_format.load, ('.csv',), 'a .csv file'),
    'numpy': Loader(numpy_format.load, ('.npy', '.npz'), 'a .npy/.npz file'),
}


def detect_format(path):
    """The LOADERS name of a data path: a folder's ('txt'), or the one whose file ending
    it has ('.csv' -> 'csv', '.npy'/'.npz' -> 'numpy'); else DataError."""
    folder = os.path.isdir(path)
    for name, loader in LOADERS.items():
        if (folder and not loader.suffixes) or (
                not folder and loader.suffixes and path.lower().endswith(loader.suffixes)):
            return name
    if not os.path.exists(path):
        raise DataError(f"{path}: data path does not exist (check DATA_DIR / TEST_DIR in params.py)")
    described = [loader.described for loader in LOADERS.values()]
    raise DataError(f"{path}: cannot tell the data format: expected {', '.join(described[:-1])} "
                    f"or {described[-1]} (or set DATA_FORMAT)")


def length_policy(settings):
    return LengthPolicy(settings.INPUT_SIZE, settings.PAD_TOLERANCE, settings.SHORTER,
                        settings.LONGER)


def label_spec(settings):
    """The label rules of the settings (LABEL_MODE, LABEL_SEPARATOR, CLASSES)."""
    return LabelSpec(settings.LABEL_MODE, settings.LABEL_SEPARATOR, tuple(settings.CLASSES))


def load_data(path, settings, progress=True):
    """Segments of a data path in any supported format (DATA_FORMAT, or detected)."""
    fmt = settings.DATA_FORMAT if settings.DATA_FORMAT != 'auto' else detect_format(path)
    options = LoadOptions(policy=length_policy(settings), cache_dir=settings.CACHE_DIR,
                          skip_bad=settings.SKIP_BAD_FILES, progress=progress,
                          labels=label_spec(settings))
    segments = LOADERS[fmt].load(path, options)
    _LABELS_SEEN[os.path.abspath(path)] = _label_counts(segments)
    return segments


# ----------------------------------------------------------------------------- label summary

# Characters a label (a rhythm of a file name) is expected to hold; another one ('AFİB',
# 'AFIB<b>') is most likely a typo or a stray character, and would silently be class 0.
PLAIN_LABEL = re.compile(r'[A-Za-z0-9_+() ]*')
PLAIN_LABEL_RULE = '[A-Za-z0-9_+() ]'
_LABELS_SEEN = {}       # abspath of a data path -> _label_counts of its latest load_data
_MAX_LISTED = 30        # distinct labels listed per source (the rest are counted)


def _label_counts(segments):
    """[(label text, segments, first segment's name)] of segments, labels sorted ([] for
    unlabelled data, or a loader's result that is not a Segments)."""
    rhythms = getattr(segments, 'rhythms', None)
    if not getattr(segments, 'has_labels', False) or rhythms is None or not len(rhythms):
        return []
    distinct, first, counts = np.unique(np.asarray(segments.rhythms, dtype=str),
                                        return_index=True, return_counts=True)
    return [(str(d), int(c), str(segments.names[i])) for d, i, c in zip(distinct, first, counts)]


def label_class(label, settings):
    """What training target label text gets: the class (an int), the CLASSES names it holds
    (multi-label) or None when it is not one of CLASSES (encode_labels' error)."""
    spec = label_spec(settings)
    if spec.multilabel:
        return [name for name in spec.split(label)]
    if not settings.CLASSES:
        return int(label in tuple(settings.POSITIVE_LABELS))
    index = {str(c): i for i, c in enumerate(settings.CLASSES)}
    return index.get(label)


def with_label_lines(summary, settings):
    """The data summary (public.data.prepare.prepare_data's) with label_lines(settings) added
    before its closing 'device: ...' line."""
    lines = summary.split('\n')
    tail = [lines.pop()] if lines and lines[-1].startswith('device:') else []
    return '\n'.join(lines + label_lines(settings) + tail)


def label_lines(settings):
    """Lines for the data summary: every distinct label of DATA_DIR and TEST_DIR (as read
    by the latest load_data) with its segment count and the class it became, so a stray
    label ('AFİB<b>' -> 0) is visible; plus a warning per label with characters outside
    PLAIN_LABEL_RULE, naming its first file."""
    lines = []
    for source in (settings.DATA_DIR, settings.TEST_DIR):
        seen = _LABELS_SEEN.get(os.path.abspath(source)) if source else None
        if not seen:
            continue
        spec = label_spec(settings)
        shown = []
        for label, count, _ in seen[:_MAX_LISTED]:
            target = label_class(label, settings)
            to = ('' if spec.multilabel else
                  ' -> not in CLASSES' if target is None else f" -> {target}")
            shown.append(f"{label!r} {count}{to}")
        more = len(seen) - _MAX_LISTED
        rule = ('label: segments' if spec.multilabel else
                'label: segments -> class' + ('' if settings.CLASSES else
                                              f" (1 = POSITIVE_LABELS="
                                              f"{tuple(settings.POSITIVE_LABELS)!r})"))
        lines.append(f"labels of {source} ({rule}): {', '.join(shown)}"
                     + (f" and {more} more" if more > 0 else ''))
        for label, count, name in seen:
            parts = spec.split(label) if spec.multilabel else [label]
            odd = sorted({ch for part in parts for ch in part
                          if not PLAIN_LABEL.fullmatch(ch)})
            if odd:
                target = label_class(label, settings)
                became = ('' if spec.multilabel or target is None else
                          f"; it is labelled class {target}")
                lines.append(f"warning: {source}: label {label!r} ({count} segment(s), first "
                             f"{name}) has character(s) {', '.join(map(repr, odd))} outside "
                             f"{PLAIN_LABEL_RULE}{became}; check its file name(s) or "
                             f"label(s)")
    return lines


def num_classes(settings):
    """Model outputs: len(CLASSES) (one per class, or per label when multi-label), else 2."""
    return len(settings.CLASSES) if settings.CLASSES else 2


def encode_labels(segments, settings, source):
    """Training targets of segments' label text: the index in CLASSES (int64 (N,),
    multi-class), 1/0 via POSITIVE_LABELS (int64 (N,), binary), or multi-hot in CLASSES
    order (float32 (N, K), LABEL_MODE='multilabel'). An unknown label is a DataError naming
    the source, the segment, the label and CLASSES."""
    spec = label_spec(settings)
    if spec.multilabel:
        return _multi_hot(segments, spec, source)
    if not settings.CLASSES:
        return segments.labels(settings.POSITIVE_LABELS)
    index = {str(c): i for i, c in enumerate(settings.CLASSES)}
    labels = np.empty(len(segments.rhythms), dtype=np.int64)
    for i, label in enumerate(segments.rhythms):
        if label not in index:
            raise DataError(f"{source}: {segments.names[i]} has label {label!r}, which is not "
                            f"in CLASSES={settings.CLASSES!r}")
        labels[i] = index[label]
    return labels


def _multi_hot(segments, spec, source):
    index = {name: i for i, name in enumerate(spec.names)}
    rhythms = np.asarray(segments.rhythms, dtype=str)
    # A data set holds a few distinct label sets: encode each once (in the order of their
    # first segments, so an error names the first bad segment), then index by segment.
    distinct, first, inverse = np.unique(rhythms, return_index=True, return_inverse=True)
    rows = np.zeros((len(distinct), len(index)), dtype=np.float32)
    for r in np.argsort(first):
        text, i = str(distinct[r]), int(first[r])
        for label in spec.split(text):
            if label not in index:
                raise DataError(f"{source}: {segments.names[i]} has label {label!r} (of "
                                f"{text!r}), which is not in CLASSES={spec.classes!r}; a "
                                f"multi-label segment's labels are CLASSES names joined with "
                                f"LABEL_SEPARATOR={spec.separator!r}")
            rows[r, index[label]] = 1
    return rows[inverse.reshape(-1)]


def split_by_folds(folds, val_folds, source):
    """(train_idx, val_idx) from predefined folds: validation = segments whose fold is in
    val_folds (PTB-XL's recommended split uses strat_fold 9 and 10)."""
    if folds is None:
        raise DataError(f"{source}: VAL_FOLDS is set but the data has no fold column/array "
                        f"(a CSV 'fold' column or an .npz 'fold' array)")
    val_mask = np.isin(folds, [str(f) for f in val_folds])
    if val_mask.all() or not val_mask.any():
        raise DataError(f"{source}: VAL_FOLDS={tuple(val_folds)!r} leaves "
                        f"{'no training' if val_mask.all() else 'no validation'} segment; folds "
                        f"present: {sorted(set(folds.tolist()))[:20]}")
    return np.flatnonzero(~val_mask), np.flatnonzero(val_mask)


def split_by_subject(subjects, labels, val_fraction, seed, *, source=None):
    """(train_idx, val_idx): whole subjects on one side, about val_fraction of subjects in
    validation, every class on both sides where the data allows it (deterministic in seed).
    labels are (N,) classes, or (N, K) multi-hot: then every label that some segment has
    should have a segment on both sides. source (the data folder or file) is named in the
    error when there are too few subjects."""
    unique = np.unique(subjects)
    if len(unique) < 2:
        where = f"{source}: the training data" if source else "the training data"
        raise DataError(f"{where} has {len(unique)} subject(s); a subject-wise validation "
                        f"split needs at least 2 (subjects come from the file names "
                        f"S<subject>-..., or a CSV/.npz subject column)")
    labels = np.asarray(labels)
    present = _present(labels)
    n_val = min(len(unique) - 1, max(1, int(round(val_fraction * len(unique)))))
    rng = np.random.default_rng(seed)
    for _ in range(100):
        val_subjects = rng.permutation(unique)[:n_val]
        val_mask = np.isin(subjects, val_subjects)
        if _present(labels[val_mask]) == present == _present(labels[~val_mask]):
            break
    return np.flatnonzero(~val_mask), np.flatnonzero(val_mask)


def _present(labels):
    """The classes that labels hold: (N,) -> its distinct values; (N, K) multi-hot -> the
    columns with at least one positive segment."""
    if labels.ndim == 2:
        return frozenset(np.flatnonzero(labels.any(axis=0)).tolist())
    return frozenset(np.unique(labels).tolist())
