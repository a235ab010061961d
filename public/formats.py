"""Loaders for the other data formats the seed systems bring: a CSV of segments, NumPy arrays.

Both return `public.dataset.Segments` (x is (N, C, L) float32; rhythms holds each segment's
label TEXT, '' when unlabelled) and apply a `LengthPolicy` to every segment, so that a
segment a little short is zero-padded, a too-short one excluded and counted, a long one
cropped, or an error raised, exactly as for a folder of .txt files.

CSV (the Tianchi heartbeat format, seed 003): a header row; one segment per row; its
samples comma-separated in ONE quoted field; an optional integer label; an optional
subject column for subject-wise validation splits (without it each row is its own subject),
and an optional `fold` column of predefined folds (PTB-XL's strat_fold; see VAL_FOLDS).
A test file has no label column, or an empty one (has_labels is False, rhythms are all '').

    id,heartbeat_signals,label
    0,"0.991,0.943,0.764,...,0.0",0.0
    1,"0.971,0.929,0.573,...,0.0",2

    segments = load_csv('train.csv', LengthPolicy(205), cache_dir='.atml-cache')

NumPy: `.npz` with array `x` of shape (N, L) or (N, C, L), and optionally `y` (N,) labels
(integers or strings), `subject` (N,), `fold` (N,) and `id` (N,); a `.npy` file holds `x` alone
(unlabelled; ids are the row indices).

    np.savez('ptbxl.npz', x=signals, y=labels, subject=patient_ids)
    segments = load_numpy('ptbxl.npz', LengthPolicy(1000))

A bad row or array raises DataError naming the file, the row (1-based data row and its id)
or array index, what is wrong and the rule. CSV parsing is vectorised (pandas' C parser
reads the signal strings of a chunk of rows at once); a chunk it cannot read cleanly is
parsed again row by row, which finds and names the first bad value. A parsed CSV is cached
in cache_dir, keyed on the file's path, size and modification time and the length policy.
"""
import io
import os

import numpy as np
import pandas as pd

from public.dataset import (LOAD_ERRORS, DataError, Segments, cache_entry, excerpt, load_cached,
                            save_cached)

_CACHE_VERSION = 3
_CHUNK_ROWS = 20000     # rows parsed per pandas call: bounds the joined text held in memory


# ----------------------------------------------------------------------------- CSV

def load_csv(path, policy, cache_dir=None, id_column='id', signal_column='heartbeat_signals',
             label_column='label', subject_column='subject'):
    """Segments of a CSV file (see the module docstring); x is (N, 1, input_size)."""
    path = os.fspath(path)
    stat = _stat(path)
    columns = (id_column, signal_column, label_column, subject_column, 'fold')
    if cache_dir:
        prefix, stem = cache_entry(cache_dir, path, repr(
            (_CACHE_VERSION, stat.st_size, stat.st_mtime_ns, policy, columns)))
        cached = load_cached(stem)
        if cached is not None:
            return cached
    table = _read_table(path)
    for required in (id_column, signal_column):
        if required not in table.columns:
            raise DataError(f"{path}: has no {required!r} column (columns: "
                            f"{_column_list(table.columns)}); a segment CSV needs a "
                            f"header row with columns {id_column!r} and {signal_column!r}, "
                            f"optionally {label_column!r} and {subject_column!r}")
    ids = _ids(path, table[id_column].str.strip().to_numpy(dtype=str), id_column)
    labels = (np.char.strip(table[label_column].to_numpy(dtype=str))
              if label_column in table.columns else None)
    has_labels = labels is not None and (labels != '').any()   # an all-empty column: unlabelled
    rhythms = (_labels(path, labels, ids, label_column) if has_labels
               else np.full(len(ids), '', dtype=str))
    subjects = ids
    if subject_column in table.columns:
        subjects = table[subject_column].str.strip().to_numpy(dtype=str)
        _no_empty(path, subjects, ids, subject_column,
                  "every row needs a subject when the column is present")
    folds = None
    if 'fold' in table.columns:              # predefined folds (PTB-XL's strat_fold), VAL_FOLDS
        folds = table['fold'].astype(str).str.strip().to_numpy(dtype=str)
        _no_empty(path, folds, ids, 'fold', "every row needs a fold when the column is present")
    groups = _parse_signals(path, table[signal_column], ids, signal_column)
    x, keep, excluded = _fit_groups(groups, len(ids), policy, lambda i: _where(path, i, ids[i]),
                                    ids)
    if not keep.any():
        raise DataError(f"{path}: no usable row: all {len(ids)} rows are shorter than "
                        f"INPUT_SIZE={policy.input_size} - PAD_TOLERANCE={policy.pad_tolerance} "
                        f"(first: id {excluded[0][0]}, {excluded[0][1]})")
    segments = Segments(x=np.ascontiguousarray(x[keep][:, None, :]), rhythms=rhythms[keep],
                        subjects=subjects[keep], names=ids[keep], excluded=excluded,
                        has_labels=has_labels, folds=None if folds is None else folds[keep])
    if cache_dir:
        save_cached(cache_dir, prefix, stem, segments)
    return segments


def _stat(path):
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise DataError(f"{path}: data file does not exist (check DATA_DIR / TEST_DIR in "
                        f"params.py)") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read: {exc.strerror or exc}") from None


def _read_table(path):
    # Every field as text: ids keep their spelling ('007'), labels are checked here, and an
    # empty field stays '' (not NaN) so that it can be reported by row.
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False,
                           skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty; a segment CSV needs a header row and one "
                        f"row per segment") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: is not a readable CSV file: {exc}") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read: {exc.strerror or exc}") from None


def _column_list(columns, shown=8):
    """The first columns' names, each a short escaped excerpt (a binary file's header
    could hold hundreds of bytes)."""
    names = ', '.join(excerpt(str(c)) for c in columns[:shown])
    return names + (f", ... ({len(columns)} columns)" if len(columns) > shown else '')


def _where(path, index, row_id):
    return f"{path}: row {index + 1} (id {row_id})"


def _no_empty(path, values, ids, column, rule):
    empty = np.flatnonzero(values == '')
    if len(empty):
        raise DataError(f"{_where(path, empty[0], ids[empty[0]])}: {column!r} is empty; {rule}")


def _ids(path, ids, column):
    if not len(ids):
        raise DataError(f"{path}: has a header but no data rows")
    empty = np.flatnonzero(ids == '')
    if len(empty):
        raise DataError(f"{path}: row {empty[0] + 1}: {column!r} is empty; every row needs a "
                        f"unique id")
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        duplicate = str(unique[counts > 1][0])
        rows = np.flatnonzero(ids == duplicate)[:2] + 1
        raise DataError(f"{path}: rows {rows[0]} and {rows[1]} have the same {column} "
                        f"{duplicate!r}; ids must be unique (they name the rows of predictions)")
    return ids


def _labels(path, labels, ids, column):
    """Label text per row ('3' for 3 or 3.0); DataError names the first bad row."""
    _no_empty(path, labels, ids, column, f"a file with a {column!r} column needs a label in "
                                         f"every row (a test file has no {column!r} column)")
    text = {}
    for value in map(str, np.unique(labels)):     # a handful of distinct labels: check each once
        try:
            number = float(value)
        except ValueError:
            number = float('nan')
        if not np.isfinite(number) or number != int(number):
            row = np.flatnonzero(labels == value)[0]
            raise DataError(f"{_where(path, row, ids[row])}: {column} {excerpt(value)} is not "
                            f"an integer; labels must be integer class numbers (e.g. 0..3)")
        text[value] = str(int(number))
    return np.asarray([text[v] for v in labels], dtype=str)


def _parse_signals(path, signals, ids, column):
    """{length: (row indices, float32 array (rows, length))} of all rows."""
    groups = {}
    for start in range(0, len(signals), _CHUNK_ROWS):
        texts = signals.iloc[start:start + _CHUNK_ROWS].tolist()
        block = _parse_block(texts)
        if block is not None:
            _add(groups, block.shape[1], np.arange(start, start + len(texts)), block)
            continue
        for offset, text in enumerate(texts):
            row = start + offset
            values = _parse_row(text, _where(path, row, ids[row]), column)
            _add(groups, len(values), np.array([row]), values[None, :])
    return {length: (np.concatenate([r for r, _ in parts]), np.concatenate([v for _, v in parts]))
            for length, parts in groups.items()}


def _add(groups, length, rows, values):
    groups.setdefault(length, []).append((rows, values))


def _parse_block(texts):
    """(rows, L) float32 array when every text holds L finite numbers; else None."""
    try:
        block = pd.read_csv(io.BytesIO('\n'.join(texts).encode()), header=None,
                            dtype=np.float32, engine='c', na_filter=False,
                            skip_blank_lines=False).to_numpy()
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return None
    # Shorter rows are NaN-filled by the parser and 'nan' parses: both fail the check.
    if block.shape[0] != len(texts) or not np.isfinite(block).all():
        return None
    return block


def _parse_row(text, where, column):
    """One row's samples, precisely: float32 array, or DataError naming the bad value."""
    if not text.strip():
        raise DataError(f"{where}: {column!r} is empty; every row needs its samples as "
                        f"comma-separated numbers")
    tokens = text.split(',')
    try:
        values = np.array(tokens, dtype=np.float32)
    except ValueError:
        values = None
    for j, token in enumerate(tokens):
        try:
            number = float(token) if values is None else values[j]
        except ValueError:
            raise DataError(f"{where}: value {j + 1} of {column!r}, {excerpt(token.strip())}, "
                            f"is not a number; samples must be comma-separated numbers") from None
        if not np.isfinite(number):
            raise DataError(f"{where}: value {j + 1} of {column!r}, {excerpt(token.strip())}, "
                            f"is not a finite number")
    return values


def _fit_groups(groups, n_rows, policy, where, names):
    """Apply the length policy to each group of equal-length rows at once.

    LengthPolicy.fit works on an (L, C) array and only looks at L, so a group of rows is fit
    in one call as (L, rows): the rows ride along as 'channels'. A policy error names the
    group's first row. Returns (x (n_rows, input_size), keep mask, excluded list)."""
    x = np.zeros((n_rows, policy.input_size), dtype=np.float32)
    keep = np.zeros(n_rows, dtype=bool)
    excluded = []      # (row, name, reason)
    for length, (rows, values) in sorted(groups.items(), key=lambda g: g[1][0][0]):
        fitted = policy.fit(values.T, where(rows[0]))
        if fitted is None:
            reason = (f"{length} samples < INPUT_SIZE={policy.input_size} - "
                      f"PAD_TOLERANCE={policy.pad_tolerance}")
            excluded += [(r, names[r], reason) for r in rows]
            continue
        x[rows] = fitted.T
        keep[rows] = True
    return x, keep, [(name, reason) for _, name, reason in sorted(excluded)]


# ----------------------------------------------------------------------------- NumPy

def load_numpy(path, policy):
    """Segments of a .npz (x, optional y / subject / id) or .npy (x only) file."""
    path = os.fspath(path)
    _stat(path)
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
    has_labels = _array_column(path, arrays, 'y', n) is not None
    rhythms = _label_text(path, arrays['y']) if has_labels else np.full(n, '', dtype=str)
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
                        f".npz needs x (N, L) or (N, C, L), optionally y, subject and id (N,)")
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
