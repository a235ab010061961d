"""Loader of a CSV of segments, one segment per row (DATA_FORMAT='csv').

The Tianchi heartbeat format (seed 003) and PTB-XL exports (seed 004): a header row; one
segment per row; its samples comma-separated in ONE quoted field; an optional label; an
optional subject column for subject-wise validation splits (without it each row is its own
subject), and an optional `fold` column of predefined folds (PTB-XL's strat_fold; see
VAL_FOLDS). A test file has no label column, or an empty one (has_labels is False, rhythms
are all ''). Imports only public.data.segments (see its docstring for the layout of the data path).

    id,heartbeat_signals,label
    0,"0.991,0.943,0.764,...,0.0",0.0
    1,"0.971,0.929,0.573,...,0.0",2

    segments = load_csv('train.csv', LengthPolicy(205), cache_dir='.atml-cache')

Labels: with LABEL_MODE='multiclass' (the default) a label is an integer class number
('3' for 3 or 3.0) and every row needs one. With LABEL_MODE='multilabel' a label is the
row's label names joined with LABEL_SEPARATOR, e.g. `NORM|MI` (spaces around names are
dropped), and an empty label means none of the labels (PTB-XL has such records); names
are checked against CLASSES by public.data.loading.encode_labels.

    segments = load_csv('ptbxl.csv', LengthPolicy(1000),
                        label_spec=LabelSpec('multilabel', '|', ('NORM', 'MI', 'STTC')))

A bad row raises DataError naming the file, the row (1-based data row and its id), what is
wrong and the rule. Parsing is vectorised (pandas' C parser reads the signal strings of a
chunk of rows at once); a chunk it cannot read cleanly is parsed again row by row, which
finds and names the first bad value. A parsed CSV is cached in cache_dir, keyed on the
file's path, size and modification time, the length policy, the column names and the label
rules that change parsing (LabelSpec.parse_key).
"""
import io
import os

import numpy as np
import pandas as pd

from public.data.segments import (DataError, LabelSpec, Segments, cache_entry, excerpt, load_cached,
                                  save_cached, stat_file)

_CACHE_VERSION = 4
_CHUNK_ROWS = 20000     # rows parsed per pandas call: bounds the joined text held in memory


def load(path, options):
    """Segments of a CSV file (the loader entry of public.data.loading.LOADERS)."""
    return load_csv(path, options.policy, cache_dir=options.cache_dir, label_spec=options.labels)


def load_csv(path, policy, cache_dir=None, id_column='id', signal_column='heartbeat_signals',
             label_column='label', subject_column='subject', label_spec=LabelSpec()):
    """Segments of a CSV file (see the module docstring); x is (N, 1, input_size)."""
    path = os.fspath(path)
    stat = stat_file(path)
    columns = (id_column, signal_column, label_column, subject_column, 'fold')
    if cache_dir:
        prefix, stem = cache_entry(cache_dir, path, repr(
            (_CACHE_VERSION, stat.st_size, stat.st_mtime_ns, policy, columns,
             label_spec.parse_key())))
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
    if not has_labels:
        rhythms = np.full(len(ids), '', dtype=str)
    elif label_spec.multilabel:
        rhythms = _multilabel_text(path, labels, ids, label_column, label_spec)
    else:
        rhythms = _labels(path, labels, ids, label_column)
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
    for value, row in _distinct(labels):          # a handful of distinct labels: check each once
        try:
            number = float(value)
        except ValueError:
            number = float('nan')
        if not np.isfinite(number) or number != int(number):
            raise DataError(f"{_where(path, row, ids[row])}: {column} {excerpt(value)} is not "
                            f"an integer; labels must be integer class numbers (e.g. 0..3), or "
                            f"label names joined with LABEL_SEPARATOR when "
                            f"LABEL_MODE='multilabel'")
        text[value] = str(int(number))
    return np.asarray([text[v] for v in labels], dtype=str)


def _multilabel_text(path, labels, ids, column, spec):
    """Each row's label names joined with spec.separator, spaces around names dropped
    ('NORM | MI' -> 'NORM|MI'; '' = no label); DataError names the first row with an empty
    name between separators ('NORM||MI', 'MI|')."""
    text = {}
    for value, row in _distinct(labels):          # a few distinct label sets: check each once
        tidy = spec.tidy(value)
        if tidy is None:
            raise DataError(f"{_where(path, row, ids[row])}: {column} {excerpt(value)} has an "
                            f"empty label name; a multi-label {column} holds label names joined "
                            f"with LABEL_SEPARATOR={spec.separator!r} (e.g. "
                            f"{spec.join(spec.names[:2] or ('NORM', 'MI'))!r}), or is empty for "
                            f"none")
        text[value] = tidy
    return np.asarray([text[v] for v in labels], dtype=str)


def _distinct(values):
    """(value, first row) of each distinct value, in the order of their first rows: checking
    these finds the first bad row."""
    unique, first = np.unique(values, return_index=True)
    order = np.argsort(first)
    return [(str(v), int(r)) for v, r in zip(unique[order], first[order])]


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
