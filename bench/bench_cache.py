"""Cached-load benchmark: what the cache's crc32 verification costs (run by hand).

    python ../shared/tools/npz_to_txt.py /tmp/atml-60k --repeat 3      # 60,000 files
    python bench/bench_cache.py --folder /tmp/atml-60k

Parses the folder once into a fresh cache (unless --cache names one already filled), then
times, interleaved so that the machine's load hits every variant alike: a cached
load_folder with verification (the default) and without it, its parts (listing the
folder, load_cached with and without verification) and the checksum candidates over the
cached array (crc32 in threads as the cache uses it, crc32, adler32, blake2b, sha1 in one
thread). Every figure is the median of --repeats runs (min-max after it); the core count
and load average are printed with them. The page cache is warm (a later run's case).
"""
import argparse
import functools
import glob
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
import zlib

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from public import dataset  # noqa: E402
import public.data.txt_format as format_txt  # noqa: E402

CHUNK = 1 << 24


def one_thread(update, data):
    value = 0
    for i in range(0, len(data), CHUNK):
        value = update(data[i:i + CHUNK], value)
    return value


def hashed(name, data):
    digest = hashlib.new(name)
    for i in range(0, len(data), CHUNK):
        digest.update(data[i:i + CHUNK])
    return digest.hexdigest()


def unverified_load_folder(folder, cache):
    """load_folder with load_cached(verify=False): the cached load before verification."""
    verified = format_txt.load_cached          # the name the txt loader calls
    format_txt.load_cached = functools.partial(verified, verify=False)
    try:
        return dataset.load_folder(folder, 1250, cache, progress=False)
    finally:
        format_txt.load_cached = verified


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--folder', default='/tmp/atml-60k')
    ap.add_argument('--cache', help='cache folder (default: a fresh temporary one)')
    ap.add_argument('--repeats', type=int, default=7)
    a = ap.parse_args()
    cache = a.cache or tempfile.mkdtemp(prefix='atml-bench-cache-')
    print(f"os.cpu_count()={os.cpu_count()}, load average {os.getloadavg()[0]:.2f}, "
          f"folder {a.folder}, cache {cache}")
    try:
        start = time.perf_counter()
        first = dataset.load_folder(a.folder, 1250, cache, progress=False)
        print(f"first load ({'cache' if first.from_cache else 'parse + write cache'}): "
              f"{time.perf_counter() - start:.2f} s; {len(first)} segments, x {first.x.shape} "
              f"= {first.x.nbytes / 1e6:.0f} MB")
        del first
        (meta,) = glob.glob(os.path.join(cache, '*.meta.npz'))
        stem = meta[:-len('.meta.npz')]
        x = np.load(stem + '.npy', mmap_mode='r')
        data = x.reshape(-1).view(np.uint8)

        def cached(fn):
            segments = fn()
            assert segments is not None and segments.from_cache, 'not a cache hit'

        variants = {
            'load_folder, cached, verified (default)':
                lambda: cached(lambda: dataset.load_folder(a.folder, 1250, cache, progress=False)),
            'load_folder, cached, not verified':
                lambda: cached(lambda: unverified_load_folder(a.folder, cache)),
            '  listing: scandir + stat of every file': lambda: format_txt.listing(a.folder),
            '  load_cached(verify=True)': lambda: cached(lambda: dataset.load_cached(stem)),
            '  load_cached(verify=False)':
                lambda: cached(lambda: dataset.load_cached(stem, verify=False)),
            'checksum: crc32, 16 MiB chunks in threads (used)': lambda: dataset.checksums(x),
            'checksum: crc32, one thread': lambda: one_thread(zlib.crc32, data),
            'checksum: adler32, one thread': lambda: one_thread(zlib.adler32, data),
            'checksum: blake2b, one thread': lambda: hashed('blake2b', data),
            'checksum: sha1, one thread': lambda: hashed('sha1', data),
        }
        times = {name: [] for name in variants}
        for _ in range(a.repeats):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(t) for name, t in times.items()}
        print(f"\nmedian of {a.repeats} interleaved runs (min-max), warm page cache:")
        for name, t in times.items():
            print(f"  {name:50s} {med[name] * 1000:7.0f} ms  ({min(t) * 1000:.0f}-"
                  f"{max(t) * 1000:.0f})")
        verified = med['load_folder, cached, verified (default)']
        cost = verified - med['load_folder, cached, not verified']
        alone = med['  load_cached(verify=True)'] - med['  load_cached(verify=False)']
        print(f"\nverification cost: {cost * 1000:.0f} ms = {cost / verified:.0%} of the "
              f"verified cached load ({verified:.2f} s; target 0.5 s); in load_cached alone: "
              f"{alone * 1000:.0f} ms; os.cpu_count()={os.cpu_count()}, load average now "
              f"{os.getloadavg()[0]:.2f}")
    finally:
        if not a.cache:
            shutil.rmtree(cache, ignore_errors=True)


if __name__ == '__main__':
    main()
