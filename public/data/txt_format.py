"""Loader of the original ATML format: a folder of .txt segment files (DATA_FORMAT='txt').

One `.txt` file per segment, one sample per line (several whitespace-separated columns =
several leads), named `S<subject>-<RHYTHM>-<index>.txt`; the RHYTHM is the label text.
Imports only public.data.segments (see its docstring for the layout of the data path).

    segments = load_folder('ttdata/train', input_size=1250, cache_dir='.atml-cache')
    segments = load('ttdata/train', LoadOptions(LengthPolicy(1250), '.atml-cache'))

Parsing is the original's main cost (np.loadtxt per file, every epoch). Here a folder is
parsed once, in parallel chunks through pandas' C parser, then cached as .npy keyed by the
folder's listing (names, sizes, mtimes): a file added, edited or removed re-parses the
folder, a later load of an unchanged folder reads the cache. A bad file raises DataError
naming the file, the line and the rule, or with skip_bad=True is skipped and counted; so
is a bad file name (an <index> that is not letters, digits or _, e.g. a file manager's
'S1-N-3 copy.txt') and a folder entry that cannot be followed (a symbolic link that loops).

A file name holds one label, so LABEL_MODE='multilabel' needs a CSV or .npz source.
"""
import concurrent.futures as futures
import errno
import io
import multiprocessing
import os
import re

import numpy as np
import pandas as pd
from tqdm import tqdm

from public.data.segments import (DataError, LengthPolicy, Segments, cache_entry, excerpt,
                                  load_cached, save_cached)

FILENAME_PATTERN = re.compile(r'^(?P<subject>S[^-]*)-(?P<rhythm>[^-]*)-(?P<index>[^-]+)\.txt$')
FILENAME_RULE = "S<subject>-<RHYTHM>-<index>.txt (e.g. S12-AFIB-31.txt, S47--0.txt)"
# The index numbers a subject's segments: letters, digits and _ ('31', 'x7'). A space or
# brackets mark a file manager's copy ('S1-N-3 copy.txt', 'S1-N-3 (1).txt'): not a segment.
INDEX_PATTERN = re.compile(r'[A-Za-z0-9_]+')
INDEX_RULE = "its <index> must be letters, digits or _ only (e.g. 31)"
_CACHE_VERSION = 8         # 8: an index with other characters is a bad file name
_CHUNK = 1000


def load(path, options):
    """Segments of a folder (the loader entry of public.data.loading.LOADERS)."""
    if options.labels.multilabel:
        raise DataError(f"{path}: LABEL_MODE='multilabel' needs a CSV or .npz source (a label "
                        f"column of labels joined with LABEL_SEPARATOR="
                        f"{options.labels.separator!r}, or an .npz y of shape (N, K)); a folder "
                        f"of .txt files holds one label per file name ({FILENAME_RULE})")
    return load_folder(path, options.policy.input_size, options.cache_dir, options.skip_bad,
                       progress=options.progress, length_policy=options.policy)


def parse_filename(name, shown=None):
    """(subject, rhythm) of a file name, or DataError naming the file (as `shown`, default
    the name), the pattern and, for a bad index, the index and its rule."""
    shown = shown or name
    match = FILENAME_PATTERN.match(name)
    if not match:
        raise DataError(f"{shown}: file name does not follow the pattern {FILENAME_RULE}")
    index = match['index']
    if not INDEX_PATTERN.fullmatch(index):
        copy = any(c.isspace() or c in '()[]' for c in index)
        raise DataError(f"{shown}: file name does not follow the pattern {FILENAME_RULE}: "
                        f"{INDEX_RULE}, got index {index!r}"
                        + ("; it looks like a copy made by a file manager: remove it, or "
                           "rename it to a new index" if copy else ''))
    return match['subject'], match['rhythm']


def parse_segment_text(blob, name, input_size):
    """Parse one file's bytes precisely: (L, C) float32, or DataError saying what is wrong.
    input_size is an int (exact length required) or a LengthPolicy (may return None:
    the segment is excluded as too short)."""
    if b'\0' in blob:
        raise DataError(f"{name}: is not a text file (it holds NUL bytes; starts with "
                        f"{excerpt(blob.lstrip())}); a segment file holds one number per line")
    text = blob.decode('utf-8', errors='replace').strip()
    if not text:
        raise DataError(f"{name}: file is empty")
    rows, columns = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            raise DataError(f"{name}: line {number} is empty; every line must hold one sample")
        if columns is None:
            columns = len(tokens)
        elif len(tokens) != columns:
            raise DataError(f"{name}: line {number} has {len(tokens)} values, earlier lines "
                            f"have {columns}; every line must hold one value per lead")
        try:
            values = [float(t) for t in tokens]
        except ValueError:
            raise DataError(f"{name}: line {number}: {excerpt(line.strip())} is not a number; "
                            f"every line must hold one number per lead") from None
        if not all(np.isfinite(values)):
            raise DataError(f"{name}: line {number}: {excerpt(line.strip())} is not a finite "
                            f"number")
        rows.append(values)
    policy = input_size if isinstance(input_size, LengthPolicy) else LengthPolicy(input_size)
    return policy.fit(np.asarray(rows, dtype=np.float32), name)


def _read(path):
    try:
        with open(path, 'rb') as f:
            return f.read()
    except OSError as exc:
        raise DataError(f"{path}: cannot be read: {exc.strerror or exc}") from None


def _parse_chunk(folder, names, policy, skip_bad):
    """Parse files `names`: (array (n_ok, L, C), kept names, skipped, excluded); skipped and
    excluded are lists of (name, reason).

    Fast path: one pandas C-parser call over the joined files, checked line counts. Any
    irregularity (or a non-number) falls back to the precise per-file parser, which names
    the file and the line."""
    blobs, kept, skipped = [], [], []
    for name in names:
        try:
            blob = _read(os.path.join(folder, name)).strip()
            if not blob:
                raise DataError(f"{os.path.join(folder, name)}: file is empty")
            blobs.append(blob + b'\n')
            kept.append(name)
        except DataError as exc:
            if not skip_bad:
                raise
            skipped.append((name, str(exc)))
    input_size = policy.input_size
    counts = [b.count(b'\n') for b in blobs]
    if kept and all(c == input_size for c in counts):
        try:
            table = pd.read_csv(io.BytesIO(b''.join(blobs)), header=None, sep=r'\s+',
                                dtype=np.float32, engine='c').to_numpy()
            if table.shape[0] == len(kept) * input_size and np.isfinite(table).all():
                return table.reshape(len(kept), input_size, table.shape[1]), kept, skipped, []
        except (ValueError, pd.errors.ParserError):
            pass
    arrays, good, excluded = [], [], []
    for name, blob in zip(kept, blobs):
        try:
            array = parse_segment_text(blob, os.path.join(folder, name), policy)
            if array is None:
                excluded.append((name, f"{len(blob.splitlines())} samples < INPUT_SIZE="
                                       f"{input_size} - PAD_TOLERANCE={policy.pad_tolerance}"))
                continue
            arrays.append(array)
            good.append(name)
        except DataError as exc:
            if not skip_bad:
                raise
            skipped.append((name, str(exc)))
    if arrays and len({a.shape[1] for a in arrays}) > 1:
        raise DataError(f"{folder}: files have different numbers of leads "
                        f"({sorted({a.shape[1] for a in arrays})}); all must have the same")
    data = np.stack(arrays) if arrays else np.zeros((0, input_size, 1), np.float32)
    return data, good, skipped, excluded


def listing(folder, skipped=None):
    """(names, stats) of a folder's data files, names sorted; hidden files and folders
    ignored. stats are (size, mtime_ns) per name: what the cache key is made of. One
    scandir pass (DirEntry.stat() stats relative to the open directory) is the cheapest
    way to stat 60,000 files here. An entry that cannot be followed (a symbolic link that
    loops, one that cannot be read) is a DataError naming it, or, given a `skipped` list
    (SKIP_BAD_FILES=True), appended there as (name, reason) and left out."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: data folder does not exist (check DATA_DIR / TEST_DIR "
                        f"in params.py)")
    entries = []
    with os.scandir(folder) as it:
        for entry in it:
            if entry.name.startswith('.'):
                continue
            try:
                if not entry.is_file():
                    continue
                st = entry.stat()
            except OSError as exc:
                path = os.path.join(folder, entry.name)
                if skipped is None:
                    raise _entry_error(path, exc, " (or set SKIP_BAD_FILES=True to skip "
                                                  "it)") from None
                skipped.append((entry.name, str(_entry_error(path, exc))))
                continue
            entries.append((entry.name, st.st_size, st.st_mtime_ns))
    if not entries:
        raise DataError(f"{folder}: data folder is empty; it must hold .txt segment files "
                        f"named {FILENAME_RULE}")
    entries.sort()
    return [e[0] for e in entries], [e[1:] for e in entries]


def _entry_error(path, exc, hint=''):
    """The DataError of a folder entry that os.stat cannot follow."""
    if exc.errno == errno.ELOOP:
        return DataError(f"{path}: is a symbolic link that loops ({exc.strerror}: it points, "
                         f"directly or through other links, back to itself); a data folder "
                         f"must hold segment files or links to them: remove or fix the "
                         f"link{hint}")
    return DataError(f"{path}: cannot be read ({exc.strerror or exc}); every entry of a data "
                     f"folder must be a readable segment file{hint}")


def _parse_folder(folder, names, policy, skip_bad, workers, progress):
    chunks = [names[i:i + _CHUNK] for i in range(0, len(names), _CHUNK)]
    bar = tqdm(total=len(names), desc=f"parse {folder}", unit='file', disable=None if progress else True,
               leave=False)
    results = []
    if workers > 1 and len(chunks) > 1:
        context = multiprocessing.get_context('fork' if os.name == 'posix' else 'spawn')
        with futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            jobs = [pool.submit(_parse_chunk, folder, c, policy, skip_bad) for c in chunks]
            for job, chunk in zip(jobs, chunks):
                results.append(job.result())
                bar.update(len(chunk))
    else:
        for chunk in chunks:
            results.append(_parse_chunk(folder, chunk, policy, skip_bad))
            bar.update(len(chunk))
    bar.close()
    leads = {r[0].shape[2] for r in results if len(r[1])}
    if len(leads) > 1:
        raise DataError(f"{folder}: files have different numbers of leads ({sorted(leads)}); "
                        f"all must have the same")
    kept = [n for r in results for n in r[1]]
    skipped = [s for r in results for s in r[2]]
    excluded = [s for r in results for s in r[3]]
    if not kept:
        raise DataError(f"{folder}: no usable segment (all {len(names)} files are bad; "
                        f"first: {skipped[0][1] if skipped else '?'})")
    x = np.concatenate([r[0] for r in results if len(r[1])]).transpose(0, 2, 1)
    return np.ascontiguousarray(x), kept, skipped, excluded


def load_folder(folder, input_size, cache_dir=None, skip_bad=False, workers=None,
                progress=True, length_policy=None):
    """All segments of a data folder, parsed once and cached (see the module docstring).
    length_policy (a LengthPolicy) allows padding/excluding/cropping; default: exact."""
    policy = length_policy or LengthPolicy(input_size)
    unlisted = [] if skip_bad else None     # entries that cannot be followed (skip_bad)
    all_names, stats = listing(folder, unlisted)
    if cache_dir:
        key = (repr((_CACHE_VERSION, policy, skip_bad)) + '\0'.join(all_names)
               + '\1' + '\0'.join(n for n, _ in unlisted or ())).encode()
        prefix, stem = cache_entry(cache_dir, folder, key + np.asarray(stats, np.int64).tobytes())
        cached = load_cached(stem)
        if cached is not None:       # the listing is unchanged, so its names were checked
            return cached
    names, skipped = [], list(unlisted or ())
    for name in all_names:
        try:
            parse_filename(name, os.path.join(folder, name))
            names.append(name)
        except DataError as exc:
            if not skip_bad:
                raise
            skipped.append((name, str(exc)))
    x, kept, parse_skipped, excluded = _parse_folder(folder, names, policy, skip_bad,
                                                     workers or min(os.cpu_count() or 1, 8),
                                                     progress)
    skipped += parse_skipped
    meta = [parse_filename(n) for n in kept]
    kept = np.asarray(kept, dtype=str)
    subjects = np.asarray([m[0] for m in meta], dtype=str)
    rhythms = np.asarray([m[1] for m in meta], dtype=str)
    segments = Segments(x=x, subjects=subjects, rhythms=rhythms, names=kept, skipped=skipped,
                        from_cache=False, excluded=excluded)
    if cache_dir:
        save_cached(cache_dir, prefix, stem, segments)
    return segments
