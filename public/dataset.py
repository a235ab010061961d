"""Data: parse a folder of ECG segments once, cache it, serve it from memory.

On-disk format (the original ATML's): one `.txt` file per segment, one sample per line
(several whitespace-separated columns = several leads), named
`S<subject>-<RHYTHM>-<index>.txt`. The label is 1 when RHYTHM is in POSITIVE_LABELS.

    segments = load_folder('ttdata/train', input_size=1250, cache_dir='.atml-cache')
    train_idx, val_idx = split_by_subject(segments.subjects, segments.y, 0.2, seed=42)

Parsing is the original's main cost (np.loadtxt per file, every epoch). Here a folder is
parsed once, in parallel chunks through pandas' C parser, then cached as .npy keyed by the
folder's listing (names, sizes, mtimes): a file added, edited or removed re-parses the
folder, a later load of an unchanged folder reads the cache. A bad file raises DataError
naming the file, the line and the rule, or with skip_bad=True is skipped and counted.

The cache is safe to share: every file is written under a temporary name of its own (pid
and uuid) and renamed into place, so processes loading the same folder at once each end
with a whole entry. An entry that is truncated, corrupt or whose array fails its crc32
checksum is a cache miss (one warning line naming the file): the data is parsed again and
the entry rewritten.

    prefix, stem = cache_entry('.atml-cache', 'train.csv', key)   # DataError: not a folder
    segments = load_cached(stem)          # None: absent, or corrupt (one warning line)
    save_cached('.atml-cache', prefix, stem, segments)
"""
import concurrent.futures as futures
import hashlib
import io
import multiprocessing
import os
import pickle
import re
import struct
import sys
import tokenize
import uuid
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from tqdm import tqdm

FILENAME_PATTERN = re.compile(r'^(?P<subject>S[^-]*)-(?P<rhythm>[^-]*)-(?P<index>[^-]+)\.txt$')
FILENAME_RULE = "S<subject>-<RHYTHM>-<index>.txt (e.g. S12-AFIB-31.txt, S47--0.txt)"
_CACHE_VERSION = 7
_CHUNK = 1000
_CRC_CHUNK = 1 << 24      # bytes per crc32 of a cached array; chunks are checked in parallel
_STALE_NS = 3600 * 10**9  # a temporary cache file untouched this long was left by a killed writer
# What np.load raises on a truncated, corrupt or foreign file: a bad zip (central directory,
# CRC, compression method), a short read, a bad .npy header (ValueError, or TokenError from
# its Python-2 header fallback), the pickle guard, a huge shape (found by fuzzing both files).
LOAD_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error,
               pickle.UnpicklingError, NotImplementedError, struct.error, MemoryError,
               SyntaxError, tokenize.TokenError)


from public.errors import DataError  # noqa: E402,F401  (defined there, raised here)


@dataclass(frozen=True)
class LengthPolicy:
    """What to do with a segment whose length is not INPUT_SIZE (one question: fit())."""
    input_size: int
    pad_tolerance: int = 0     # shorter by at most this many samples: zero-padded at the end
    shorter: str = 'error'     # shorter beyond the tolerance: 'error' or 'exclude' (counted)
    longer: str = 'error'      # longer: 'error' or 'crop' (keep the first input_size samples)

    def fit(self, array, name):
        """array (L, C) -> (input_size, C); None when excluded; DataError when forbidden."""
        length = len(array)
        if length == self.input_size:
            return array
        if length > self.input_size:
            if self.longer == 'crop':
                return array[:self.input_size]
            raise DataError(f"{name}: has {length} samples, but INPUT_SIZE={self.input_size}; "
                            f"longer segments are an error (LONGER='error'; 'crop' keeps the "
                            f"first INPUT_SIZE samples)")
        if self.input_size - length <= self.pad_tolerance:
            padded = np.zeros((self.input_size,) + array.shape[1:], dtype=np.float32)
            padded[:length] = array
            return padded
        if self.shorter == 'exclude':
            return None
        raise DataError(f"{name}: has {length} samples, but INPUT_SIZE={self.input_size}; "
                        f"every segment must have exactly INPUT_SIZE samples (or at most "
                        f"PAD_TOLERANCE={self.pad_tolerance} fewer, zero-padded)")


@dataclass
class Segments:
    """Segments of one folder or file, in name order. x is (N, C, L) float32. rhythms holds
    each segment's label text ('' when the source has no labels, see has_labels)."""
    x: np.ndarray
    rhythms: np.ndarray
    subjects: np.ndarray
    names: np.ndarray
    skipped: list = field(default_factory=list)   # (name, reason) of skipped bad files
    from_cache: bool = False
    excluded: list = field(default_factory=list)  # (name, reason) of too-short segments
    has_labels: bool = True
    folds: np.ndarray = None                       # predefined folds (str), when the source has them

    def labels(self, positive_labels):
        """Binary labels: 1 where the rhythm is one of positive_labels."""
        return np.isin(self.rhythms, list(positive_labels)).astype(np.int64)

    def __len__(self):
        return len(self.x)


def parse_filename(name):
    """(subject, rhythm) of a file name, or DataError naming the file and the pattern."""
    match = FILENAME_PATTERN.match(name)
    if not match:
        raise DataError(f"{name}: file name does not follow the pattern {FILENAME_RULE}")
    return match['subject'], match['rhythm']


def excerpt(value, limit=40):
    """A short, escaped excerpt of text or bytes for an error message: repr of its start,
    at most about `limit` characters, '...' when cut (a binary file's bytes stay readable)."""
    shown = repr(value)
    if len(shown) <= limit:
        return shown
    n = limit
    while n > 1 and len(repr(value[:n])) > limit - 3:
        n -= 1
    return repr(value[:n]) + '...'


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


def _listing(folder):
    """(names, stats) of a folder's data files, names sorted; hidden files and folders
    ignored. stats are (size, mtime_ns) per name: what the cache key is made of. One
    scandir pass (DirEntry.stat() stats relative to the open directory) is the cheapest
    way to stat 60,000 files here."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: data folder does not exist (check DATA_DIR / TEST_DIR "
                        f"in params.py)")
    entries = []
    with os.scandir(folder) as it:
        for entry in it:
            if not entry.name.startswith('.') and entry.is_file():
                st = entry.stat()
                entries.append((entry.name, st.st_size, st.st_mtime_ns))
    if not entries:
        raise DataError(f"{folder}: data folder is empty; it must hold .txt segment files "
                        f"named {FILENAME_RULE}")
    entries.sort()
    return [e[0] for e in entries], [e[1:] for e in entries]


def cache_entry(cache_dir, source, key):
    """(prefix, stem) of the cache entry of `source` (a folder or file) under `key` (bytes
    or str that change whenever the parsed result would). One entry per source is kept.
    DataError when cache_dir (the CACHE_DIR setting) exists but is not a folder."""
    if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
        raise DataError(f"{cache_dir}: CACHE_DIR names an existing file; CACHE_DIR must be a "
                        f"folder (it is created when missing), where parsed data is cached")
    prefix = hashlib.sha1(os.path.abspath(source).encode()).hexdigest()[:12]
    digest = hashlib.sha1(key if isinstance(key, bytes) else key.encode()).hexdigest()[:16]
    return prefix, os.path.join(cache_dir, f"{prefix}-{digest}")


def checksums(x):
    """crc32 of each _CRC_CHUNK bytes of array x's data (uint32 array), computed in threads
    (zlib releases the GIL): the cache's check that an array holds the bytes written."""
    data = np.ascontiguousarray(x).reshape(-1).view(np.uint8)
    starts = range(0, len(data), _CRC_CHUNK)
    workers = min(os.cpu_count() or 1, len(starts), 8)
    if workers <= 1:
        return np.asarray([zlib.crc32(data[i:i + _CRC_CHUNK]) for i in starts], np.uint32)
    with futures.ThreadPoolExecutor(workers) as pool:
        return np.asarray(list(pool.map(lambda i: zlib.crc32(data[i:i + _CRC_CHUNK]), starts)),
                          np.uint32)


def load_cached(stem, verify=True):
    """The Segments stored at stem, or None: a cache miss. Silent when there is no entry;
    one warning line naming the file when the entry is truncated, corrupt or its array fails
    its checksum. verify=False skips the checksum (for benchmarks)."""
    path = stem + '.meta.npz'
    try:
        with warnings.catch_warnings():       # a corrupt header can make numpy warn
            warnings.simplefilter('ignore')
            fields = _read_meta(path)
            path = stem + '.npy'
            x = np.load(path, mmap_mode='r', allow_pickle=False)
        problem = _entry_problem(x, fields, verify)
        if problem:
            _warn(f"{path}: cache entry {problem}; parsing the data again")
            return None
        pairs = {k: list(zip(fields[f"{k}_names"].tolist(), fields[f"{k}_reasons"].tolist()))
                 for k in ('skipped', 'excluded')}
        return Segments(x=x, names=fields['names'], subjects=fields['subjects'],
                        rhythms=fields['rhythms'], skipped=pairs['skipped'],
                        excluded=pairs['excluded'], has_labels=bool(fields['has_labels']),
                        folds=fields['folds'] if bool(fields['has_folds']) else None,
                        from_cache=True)
    except FileNotFoundError:        # no entry, or one removed meanwhile by another process
        return None
    except LOAD_ERRORS as exc:
        _warn(f"{path}: cache entry is unreadable ({type(exc).__name__}); parsing the data "
              f"again")
        return None


def _read_meta(path):
    """{name: array} of a cache meta file; LOAD_ERRORS when it is not a whole .npz file."""
    meta = np.load(path, allow_pickle=False)
    if not isinstance(meta, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is not an .npz file")
    with meta:
        return {k: meta[k] for k in meta.files}


def _entry_problem(x, fields, verify):
    """What is wrong with a cached array x given its meta fields, or '' when it is whole."""
    shape = tuple(fields['x_shape'].tolist())
    if x.dtype != np.float32 or x.shape != shape or len(fields['names']) != len(x):
        return (f"is corrupt (array {x.dtype} {x.shape}, meta float32 {shape}, "
                f"{len(fields['names'])} names)")
    if verify and not np.array_equal(checksums(x), fields['x_crc32']):
        return "is corrupt (its crc32 checksum does not match)"
    return ''


def _warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def save_cached(cache_dir, prefix, stem, segments):
    """Store segments at stem (x as .npy; the rest and x's checksums in .meta.npz), then drop
    the source's older entries. Each file is written under a temporary name of its own and
    renamed into place, the meta file last: its presence marks a whole entry. Processes
    saving the same entry at once each leave it whole. DataError when the CACHE_DIR folder
    cannot be made; a failed write is one warning line (the data stays in memory)."""
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{cache_dir}: CACHE_DIR cannot be created ({exc.strerror or exc}); "
                        f"CACHE_DIR must be a folder, or a path where one can be made") from None
    x = np.ascontiguousarray(segments.x)
    pairs = {}
    for kind in ('skipped', 'excluded'):
        entries = getattr(segments, kind)
        pairs[f"{kind}_names"] = np.asarray([e[0] for e in entries], dtype=str)
        pairs[f"{kind}_reasons"] = np.asarray([e[1] for e in entries], dtype=str)
    folds = segments.folds if segments.folds is not None else []
    try:
        _write_replace(stem + '.npy', lambda f: np.save(f, x))
        _write_replace(stem + '.meta.npz', lambda f: np.savez(
            f, names=np.asarray(segments.names, dtype=str),
            subjects=np.asarray(segments.subjects, dtype=str),
            rhythms=np.asarray(segments.rhythms, dtype=str), has_labels=segments.has_labels,
            has_folds=segments.folds is not None, folds=np.asarray(folds, dtype=str),
            x_shape=np.asarray(x.shape, np.int64), x_crc32=checksums(x), **pairs))
    except OSError as exc:
        _warn(f"{stem}.npy: cannot write the cache entry ({exc.strerror or exc}); the data "
              f"will be parsed again next time")
        return
    _drop_older(cache_dir, prefix, stem)


def _write_replace(path, write):
    """write(file) to a temporary file of this process and call alone, renamed to path."""
    tmp = f"{path}.{os.getpid()}-{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, 'wb') as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path):
    try:
        os.remove(path)
    except OSError:                  # already gone (another process), or not ours to remove
        pass


def _mtime_ns(path):
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _drop_older(cache_dir, prefix, stem):
    """Remove the source's other entries written no later than the one just written at stem,
    and temporary or half-written files untouched for an hour (left by killed writers).
    Another process's temporary file in progress and an entry written after this one (by a
    process with another key) are kept; the entry at stem is never removed here."""
    mine = _mtime_ns(stem + '.meta.npz')
    if mine is None:
        return
    names = [n for n in os.listdir(cache_dir) if n.startswith(prefix + '-')]
    others = {os.path.join(cache_dir, n.split('.')[0]) for n in names} - {stem}
    for other in others:
        written = _mtime_ns(other + '.meta.npz')
        if written is not None and written <= mine:
            _remove(other + '.meta.npz')         # the meta file first: the entry ends whole
            _remove(other + '.npy')
    for name in names:
        path = os.path.join(cache_dir, name)
        if name.endswith('.tmp') or (name.endswith('.npy') and
                                     not os.path.exists(path[:-4] + '.meta.npz')):
            modified = _mtime_ns(path)
            if modified is not None and mine - modified > _STALE_NS:
                _remove(path)


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
    all_names, stats = _listing(folder)
    if cache_dir:
        key = (repr((_CACHE_VERSION, policy, skip_bad)) + '\0'.join(all_names)).encode()
        prefix, stem = cache_entry(cache_dir, folder, key + np.asarray(stats, np.int64).tobytes())
        cached = load_cached(stem)
        if cached is not None:       # the listing is unchanged, so its names were checked
            return cached
    names, skipped = [], []
    for name in all_names:
        try:
            parse_filename(name)
            names.append(name)
        except DataError as exc:
            if not skip_bad:
                raise DataError(f"{os.path.join(folder, name)}: file name does not follow "
                                f"the pattern {FILENAME_RULE}") from None
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
    validation, both classes on both sides where the data allows it (deterministic in seed).
    source (the data folder or file) is named in the error when there are too few subjects."""
    unique = np.unique(subjects)
    if len(unique) < 2:
        where = f"{source}: the training data" if source else "the training data"
        raise DataError(f"{where} has {len(unique)} subject(s); a subject-wise validation "
                        f"split needs at least 2 (subjects come from the file names "
                        f"S<subject>-..., or a CSV/.npz subject column)")
    n_val = min(len(unique) - 1, max(1, int(round(val_fraction * len(unique)))))
    rng = np.random.default_rng(seed)
    for _ in range(100):
        val_subjects = rng.permutation(unique)[:n_val]
        val_mask = np.isin(subjects, val_subjects)
        if (len(np.unique(labels[val_mask])) == len(np.unique(labels))
                and len(np.unique(labels[~val_mask])) == len(np.unique(labels))):
            break
    return np.flatnonzero(~val_mask), np.flatnonzero(val_mask)


def detect_format(path):
    """'txt' for a folder, 'csv' for .csv, 'numpy' for .npy/.npz; else DataError."""
    if os.path.isdir(path):
        return 'txt'
    lower = path.lower()
    if lower.endswith('.csv'):
        return 'csv'
    if lower.endswith(('.npy', '.npz')):
        return 'numpy'
    if not os.path.exists(path):
        raise DataError(f"{path}: data path does not exist (check DATA_DIR / TEST_DIR in params.py)")
    raise DataError(f"{path}: cannot tell the data format: expected a folder of .txt files, a "
                    f".csv file or a .npy/.npz file (or set DATA_FORMAT)")


def length_policy(settings):
    return LengthPolicy(settings.INPUT_SIZE, settings.PAD_TOLERANCE, settings.SHORTER,
                        settings.LONGER)


def load_data(path, settings, progress=True):
    """Segments of a data path in any supported format (DATA_FORMAT, or detected)."""
    fmt = settings.DATA_FORMAT if settings.DATA_FORMAT != 'auto' else detect_format(path)
    policy = length_policy(settings)
    if fmt == 'txt':
        return load_folder(path, settings.INPUT_SIZE, settings.CACHE_DIR, settings.SKIP_BAD_FILES,
                           progress=progress, length_policy=policy)
    from public import formats
    if fmt == 'csv':
        return formats.load_csv(path, policy, cache_dir=settings.CACHE_DIR)
    return formats.load_numpy(path, policy)


def num_classes(settings):
    return len(settings.CLASSES) if settings.CLASSES else 2


def encode_labels(segments, settings, source):
    """Integer labels: the index in CLASSES (multi-class) or 1/0 via POSITIVE_LABELS."""
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
