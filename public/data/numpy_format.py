"""Loader of NumPy arrays (DATA_FORMAT='numpy'): a .npz of named arrays, or a .npy of x alone.

`.npz` with array `x` of shape (N, L) or (N, C, L), and optionally `y` labels, `subject`
(N,), `fold` (N,) and `id` (N,); a `.npy` file holds `x` alone (unlabelled; ids are the
row indices). Imports only public.data.segments (see its docstring for the layout of the data
path).

    np.savez('data.npz', x=signals, y=labels, subject=patient_ids)
    segments = load_numpy('data.npz', LengthPolicy(1000))

Labels: with LABEL_MODE='multiclass' (the default) y is (N,) integers or strings. With
LABEL_MODE='multilabel' y is either (N, K) of 0/1 (K = len(CLASSES), one column per CLASSES
name, in CLASSES order; PTB-XL's diagnostic superclasses) or (N,) text of label names joined
with LABEL_SEPARATOR ('NORM|MI'; '' = none). Either way `Segments.rhythms` holds the text:
a 0/1 row [1, 1, 0, 0, 0] under CLASSES ('NORM', 'MI', 'STTC', 'CD', 'HYP') is 'NORM|MI',
an all-zero row ''.

    np.savez('ptbxl.npz', x=signals, y=multi_hot, subject=patient_ids, fold=strat_fold)
    spec = LabelSpec('multilabel', '|', ('NORM', 'MI', 'STTC', 'CD', 'HYP'))
    segments = load_numpy('ptbxl.npz', LengthPolicy(1000), label_spec=spec)

A bad array raises DataError naming the file, the array and index, what is wrong and the
rule. Arrays are read whole (no parse cache: np.load is already fast).
"""
import os

import numpy as np

from public.data.segments import DataError, LOAD_ERRORS, LabelSpec, Segments, stat_file


def load(path, options):
    """Segments of a .npz/.npy file (the loader entry of public.data.loading.LOADERS)."""
    return load_numpy(path, options.policy, label_spec=options.labels)


def load_numpy(path, policy, label_spec=LabelSpec()):
    """Segments of a .npz (x, optional y / subject / fold / id) or .npy (x only) file."""
    path = os.fspath(path)
    stat_file(path)
    arrays = _read_arrays(path)
    x = arrays['x']
    if x.ndim == 2:
        x = x[:, None, :]
    if x.ndim != 3:
        raise DataError(f"{path}: x has shape {x.shape}; it must be (N, L) or (N, C, L): "
                        f"N segments of L samples, optionally C leads")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool) or np.iscomplexobj(x):
        raise DataError(f"{path}: x has dtype {x.dtype}; it must hold real numbers")
    if len(x) == 0 or x.shape[1] == 0:
        raise DataError(f"{path}: x has shape {x.shape}; it holds no segment")
    x = x.astype(np.float32, copy=False)
    finite = np.isfinite(x)
    if not finite.all():
        index = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise DataError(f"{path}: x[{', '.join(map(str, index))}] (segment {index[0]}) is "
                        f"{x[index]}; every sample must be a finite number")
    n = len(x)
    ids = _array_column(path, arrays, 'id', n)
    ids = np.arange(n).astype(str) if ids is None else ids
    if len(np.unique(ids)) != n:
        raise DataError(f"{path}: id holds duplicate values; ids must be unique")
    has_labels = 'y' in arrays
    rhythms = (_labels(path, arrays['y'], n, label_spec) if has_labels
               else np.full(n, '', dtype=str))
    subjects = _array_column(path, arrays, 'subject', n)
    subjects = ids if subjects is None else subjects
    folds = _array_column(path, arrays, 'fold', n)
    length = x.shape[2]
    if length != policy.input_size:
        # Every segment has the same length, so the policy decides once for all of them.
        fitted = policy.fit(x.transpose(2, 0, 1).reshape(length, -1),
                            f"{path} (x of shape {x.shape}, every segment)")
        if fitted is None:
            raise DataError(f"{path}: no usable segment: all {n} segments have {length} samples "
                            f"< INPUT_SIZE={policy.input_size} - PAD_TOLERANCE="
                            f"{policy.pad_tolerance}")
        x = fitted.reshape(policy.input_size, n, x.shape[1]).transpose(1, 2, 0)
    return Segments(x=np.ascontiguousarray(x), rhythms=rhythms, subjects=subjects, names=ids,
                    has_labels=has_labels, folds=folds)


def _read_arrays(path):
    try:
        loaded = np.load(path, allow_pickle=False)
    except LOAD_ERRORS as exc:
        raise DataError(f"{path}: cannot be read as a .npy/.npz file: {_reason(exc)}") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        return {'x': loaded}
    with loaded:
        try:
            arrays = {key: loaded[key] for key in loaded.files}
        except LOAD_ERRORS as exc:
            raise DataError(f"{path}: cannot be read as a .npz file (truncated or corrupt?): "
                            f"{_reason(exc)}") from None
    if 'x' not in arrays:
        raise DataError(f"{path}: has no array 'x' (arrays: {', '.join(arrays) or 'none'}); a "
                        f".npz needs x (N, L) or (N, C, L), optionally y, subject, fold and id "
                        f"(N,)")
    return arrays


def _reason(exc):
    """An exception's type and a short excerpt of its message (numpy may quote a whole
    corrupt header)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text if len(text) <= 80 else text[:77] + '...'}"


def _array_column(path, arrays, key, n):
    """arrays[key] as (n,) text, None when absent; DataError on a wrong shape."""
    if key not in arrays:
        return None
    values = arrays[key]
    if values.shape != (n,):
        raise DataError(f"{path}: {key} has shape {values.shape}, but x holds {n} segments; "
                        f"{key} must have shape ({n},): one value per segment")
    return _as_text(values)


def _labels(path, y, n, spec):
    """Label text per segment from y: (n,) labels, or (n, K) 0/1 when spec is multi-label."""
    if y.ndim == 2 and len(y) == n:
        if not spec.multilabel:
            raise DataError(f"{path}: y has shape {y.shape}: multi-label? set "
                            f"LABEL_MODE='multilabel' and CLASSES to the {y.shape[1]} label "
                            f"names (in y's column order); with LABEL_MODE='multiclass' y must "
                            f"have shape ({n},): one label per segment")
        return _multi_hot_text(path, y, spec)
    if y.shape != (n,):
        also = (f", or ({n}, {len(spec.classes)}): one 0/1 column per CLASSES name"
                if spec.multilabel else '')
        raise DataError(f"{path}: y has shape {y.shape}, but x holds {n} segments; y must have "
                        f"shape ({n},): one value per segment{also}")
    text = _label_text(path, y)
    if not spec.multilabel:
        return text
    tidy = {}
    unique, first = np.unique(text, return_index=True)
    for value, i in sorted(zip(unique.tolist(), first.tolist()), key=lambda pair: pair[1]):
        tidy[value] = spec.tidy(value)          # a few distinct label sets: check each once
        if tidy[value] is None:
            raise DataError(f"{path}: y[{i}] is {value!r}, which has an empty label name; a "
                            f"multi-label y holds label names joined with LABEL_SEPARATOR="
                            f"{spec.separator!r} ('' for none), or is (N, K) 0/1")
    return np.asarray([tidy[v] for v in text], dtype=str)


def _multi_hot_text(path, y, spec):
    """(n, K) 0/1 -> each row's CLASSES names joined with the separator ('' for none)."""
    n, k = y.shape
    if k != len(spec.classes):
        raise DataError(f"{path}: y has shape {y.shape}: {k} labels per segment, but "
                        f"CLASSES={spec.classes!r} names {len(spec.classes)}; a multi-label y "
                        f"must have shape ({n}, {len(spec.classes)}): one 0/1 column per "
                        f"CLASSES name, in CLASSES order")
    if y.dtype.kind not in 'biuf':
        raise DataError(f"{path}: y has shape {y.shape} and dtype {y.dtype}; a multi-label y "
                        f"(N, K) must hold 0 or 1 per segment and label")
    bad = ~((y == 0) | (y == 1))                # NaN is bad too
    if bad.any():
        row, column = (int(i) for i in np.argwhere(bad)[0])
        raise DataError(f"{path}: y[{row}, {column}] (segment {row}, label "
                        f"{spec.names[column]!r}) is {y[row, column]}; a multi-label y holds "
                        f"0 or 1 per segment and label")
    names = np.asarray(spec.names, dtype=str)
    rows, inverse = np.unique(y.astype(bool), axis=0, return_inverse=True)
    text = np.asarray([spec.join(names[row].tolist()) for row in rows], dtype=str)
    return text[inverse.reshape(-1)]


def _label_text(path, labels):
    """Label text per segment: integers (or integral floats) as '3', strings as they are."""
    if labels.dtype.kind in 'US':
        return _as_text(labels)
    if labels.dtype.kind == 'b':
        return labels.astype(np.int64).astype(str)
    if labels.dtype.kind not in 'iuf':
        raise DataError(f"{path}: y has dtype {labels.dtype}; labels must be integers or strings")
    bad = ~_integral(labels)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path}: y[{i}] is {labels[i]}, not an integer; labels must be integer "
                        f"class numbers or strings")
    return labels.astype(np.int64).astype(str)


def _integral(values):
    """Mask of values that are whole numbers (all True for integer arrays)."""
    if values.dtype.kind != 'f':
        return np.ones(values.shape, dtype=bool)
    return np.isfinite(values) & (values == np.round(values))


def _as_text(values):
    """Values as text; whole floats without their '.0' (ids 7.0 -> '7')."""
    if values.dtype.kind == 'S':
        values = np.char.decode(values, 'utf-8')
    if values.dtype.kind == 'f' and _integral(values).all():
        values = values.astype(np.int64)
    return values.astype(str)
