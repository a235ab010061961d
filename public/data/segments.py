"""What every data loader shares: Segments, the length policy, the label rules, the parse cache.

The data path has one direction (module -> what it imports):

    public/data/loading.py       entry: LOADERS table, load_data, detect_format, encode_labels,
       |                         split_by_subject / split_by_folds (public/dataset.py: its face)
       +-> public/data/txt_format.py     a folder of S<subject>-<RHYTHM>-<index>.txt files
       +-> public/data/csv_format.py     a CSV, one segment per row (Tianchi heartbeat, PTB-XL)
       +-> public/data/numpy_format.py   a .npz (x, y, subject, fold, id) or a .npy (x)
              |
              +-> public/data/segments.py   (this module; imports no other data module)

A loader module imports this module only, never public.data.loading. It exposes
`load(path, options) -> Segments`, options a `LoadOptions` (length policy, cache folder,
label rules, ...). Adding a format is one new `public/data/<name>_format.py` with such a
`load`, plus one line in `public.data.loading.LOADERS` (its name, file endings and a few
words for messages); the name must also be allowed by DATA_FORMAT's rule in
public/core/settings.py.

Labels are kept as TEXT in `Segments.rhythms` whatever the source ('AFIB', '3', and for
LABEL_MODE='multilabel' the segment's labels joined with LABEL_SEPARATOR, e.g. 'NORM|MI';
'' = no label). `public.data.loading.encode_labels` turns the text into training targets.

The parse cache is safe to share: every file is written under a temporary name of its own
(pid and uuid) and renamed into place, so processes loading the same source at once each
end with a whole entry. An entry that is truncated, corrupt or whose array fails its crc32
checksum is a cache miss (one warning line naming the file): the data is parsed again and
the entry rewritten.

    prefix, stem = cache_entry('.atml-cache', 'train.csv', key)   # DataError: not a folder
    segments = load_cached(stem)          # None: absent, or corrupt (one warning line)
    save_cached('.atml-cache', prefix, stem, segments)
"""
import concurrent.futures as futures
import hashlib
import os
import pickle
import struct
import sys
import tokenize
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field

import numpy as np

from public.core.atomic import TMP_SUFFIX, replacing
from public.core.errors import DataError  # noqa: F401  (defined there, raised by every loader)

_CRC_CHUNK = 1 << 24      # bytes per crc32 of a cached array; chunks are checked in parallel
_STALE_NS = 3600 * 10**9  # a temporary cache file untouched this long was left by a killed writer
# What np.load raises on a truncated, corrupt or foreign file: a bad zip (central directory,
# CRC, compression method), a short read, a bad .npy header (ValueError, or TokenError from
# its Python-2 header fallback), the pickle guard, a huge shape (found by fuzzing both files).
LOAD_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error,
               pickle.UnpicklingError, NotImplementedError, struct.error, MemoryError,
               SyntaxError, tokenize.TokenError)
LABEL_MODES = ('multiclass', 'multilabel')


# ----------------------------------------------------------------------------- data

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


@dataclass(frozen=True)
class LabelSpec:
    """How labels are read: one per segment ('multiclass', binary included), or a set of
    `classes` per segment ('multilabel') written as text joined with `separator`."""
    mode: str = 'multiclass'
    separator: str = '|'
    classes: tuple = ()

    def __post_init__(self):
        if self.mode not in LABEL_MODES:
            raise ValueError(f"LabelSpec mode must be one of {LABEL_MODES}, got {self.mode!r}")

    @property
    def multilabel(self):
        return self.mode == 'multilabel'

    @property
    def names(self):
        """The label names as text (CLASSES may hold ints)."""
        return tuple(str(c) for c in self.classes)

    def split(self, text):
        """The labels of one multi-label text: 'NORM|MI' -> ['NORM', 'MI'], '' -> []."""
        return [part.strip() for part in text.split(self.separator)] if text.strip() else []

    def join(self, labels):
        return self.separator.join(labels)

    def tidy(self, text):
        """A multi-label text with the spaces around its names dropped ('NORM | MI' ->
        'NORM|MI'); None when a name is empty ('NORM||MI', 'MI|')."""
        names = self.split(text)
        return None if '' in names else self.join(names)

    def parse_key(self):
        """What of these rules changes how a source's label text is parsed (a cache key part)."""
        return (self.mode, self.separator) if self.multilabel else (self.mode,)


@dataclass(frozen=True)
class LoadOptions:
    """What `load(path, options)` of every loader module is given (see the module docstring)."""
    policy: LengthPolicy
    cache_dir: str = None         # None: no parse cache
    skip_bad: bool = False        # a bad file of a folder is skipped and counted
    progress: bool = True
    labels: LabelSpec = LabelSpec()


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


def stat_file(path):
    """os.stat of a data file, or DataError naming it (missing, or unreadable)."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise DataError(f"{path}: data file does not exist (check DATA_DIR / TEST_DIR in "
                        f"params.py)") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read: {exc.strerror or exc}") from None


# ----------------------------------------------------------------------------- cache

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
    """write(file) to a temporary file of this process and call alone, renamed to path (a
    failure, a full disk too, stays an OSError: the caller warns, the data is parsed again)."""
    with replacing(path, name_full_disk=False) as tmp:
        with open(tmp, 'wb') as f:
            write(f)


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
        if name.endswith(('.tmp', TMP_SUFFIX)) or (name.endswith('.npy') and
                                     not os.path.exists(path[:-4] + '.meta.npz')):
            modified = _mtime_ns(path)
            if modified is not None and mine - modified > _STALE_NS:
                _remove(path)
