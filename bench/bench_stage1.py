"""Stage-one speed benchmark (run by hand; figures go to the README).

    python ../shared/tools/npz_to_txt.py /data/all60k --repeat 3          # 60,000 files
    python bench/bench_stage1.py --folder /data/all60k --train /data/train --test /data/test

Sections (--only to pick): parse (original np.loadtxt per file vs ATML's parse + cache,
cached load, change detection), epoch (bare loops with the original Conv2d AFNet and with
ATML's Conv1d AFNet vs ATML's train_model, batch 32 and 256), trial (one full stage-one
trial: 2 epochs, ONNX export + checks, test evaluation), memory (peak RSS of a
train_multi.py run). Every figure is the median of --repeats runs; the machine's core
count and torch thread count are printed with them.
"""
import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from public.core.settings import load_settings  # noqa: E402
from public.dataset import load_folder  # noqa: E402
from public.model import AFNet                              # noqa: E402
from public.data.prepare import TrialData  # noqa: E402
from public.train.loop import train_model


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def report(label, seconds, times=None):
    spread = f"  (runs: {', '.join(f'{t:.2f}' for t in times)})" if times and len(times) > 1 else ''
    print(f"{label:<58} {seconds:8.2f} s{spread}", flush=True)


# --------------------------------------------------------------------------- parse
def bench_parse(folder, repeats, sample):
    names = sorted(n for n in os.listdir(folder) if n.endswith('.txt'))
    print(f"\n== parse: {folder}, {len(names)} files")
    picked = names[:: max(1, len(names) // sample)][:sample]
    start = time.perf_counter()
    for n in picked:
        np.loadtxt(os.path.join(folder, n), dtype=np.float32)
    per_file = (time.perf_counter() - start) / len(picked)
    report(f"original: np.loadtxt per file, every epoch (x{len(names)}, "
           f"from {len(picked)} timed)", per_file * len(names))
    caches = []

    def first_load():
        cache = tempfile.mkdtemp(prefix='atml-bench-cache-')
        caches.append(cache)
        load_folder(folder, 1250, cache, progress=False)
    t, runs = median_time(first_load, repeats)
    report("ATML first load (parse + write cache)", t, runs)
    cache = caches[-1]
    t, runs = median_time(lambda: load_folder(folder, 1250, cache, progress=False), max(5, repeats))
    report("ATML later load (from cache)", t, runs)
    seg = load_folder(folder, 1250, cache, progress=False)
    np.asarray(seg.x[-1])
    # change detection: edit, add, remove one file; each load must re-parse and see it
    victim = os.path.join(folder, names[0])
    original = open(victim).read()
    try:
        with open(victim, 'w') as f:
            f.write("5.0\n" + original.split("\n", 1)[1])
        start = time.perf_counter()
        seg2 = load_folder(folder, 1250, cache, progress=False)
        report("after editing one file: reload (re-parse)", time.perf_counter() - start)
        assert not seg2.from_cache and not np.array_equal(seg2.x[0], seg.x[0]), 'stale cache!'
        extra = os.path.join(folder, 'S999-AFIB-0.txt')
        shutil.copy(victim, extra)
        seg3 = load_folder(folder, 1250, cache, progress=False)
        assert not seg3.from_cache and len(seg3) == len(names) + 1, 'added file missed!'
        os.remove(extra)
        seg4 = load_folder(folder, 1250, cache, progress=False)
        assert not seg4.from_cache and len(seg4) == len(names), 'removed file missed!'
        print("change detection: edit, add and remove each re-parsed (checked)")
    finally:
        with open(victim, 'w') as f:
            f.write(original)
        for c in caches:
            shutil.rmtree(c, ignore_errors=True)


# --------------------------------------------------------------------------- epoch
class OriginalAFNet(nn.Module):
    """The original ATML AFNet as it was written: Conv2d with (k, 1) kernels on (N,1,L,1)."""

    def __init__(self, input_size=1250):
        super().__init__()
        def block(i, o, k):
            return [nn.Conv2d(i, o, (k, 1), (2, 1)), nn.SiLU(), nn.BatchNorm2d(o)]
        length = input_size
        for k in (6, 5, 4, 4, 4):
            length = (length - k) // 2 + 1
        self.c1 = nn.Sequential(*block(1, 4, 6), *block(4, 8, 5), *block(8, 16, 4))
        self.se1 = _SE2d(16)
        self.c2 = nn.Sequential(*block(16, 32, 4), *block(32, 32, 4))
        self.se2 = _SE2d(32)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(32 * length, 10),
                                  nn.SiLU(), nn.Linear(10, 2))

    def forward(self, x):
        return self.head(self.se2(self.c2(self.se1(self.c1(x)))))


class _SE2d(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(c, c // 4), nn.SiLU(), nn.Linear(c // 4, c), nn.Sigmoid())

    def forward(self, x):
        return x * self.fc(x.mean((2, 3)))[:, :, None, None]


def bare_epoch(model, x, y, batch_size, lr=0.002):
    """A plain PyTorch loop: in-memory tensors, random permutation, AdamW, CE loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-3)
    criterion = nn.CrossEntropyLoss()
    model.train()
    order = torch.randperm(len(x))
    for i in range(0, len(x) - 1, batch_size):
        idx = order[i:i + batch_size]
        optimizer.zero_grad()
        loss = criterion(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()


def bench_epoch(n, repeats, batches, threads):
    torch.set_num_threads(threads)
    print(f"\n== one training epoch over {n} segments (synthetic tensors, AFNet), "
          f"torch threads {torch.get_num_threads()}")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 1250, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    x4 = x.unsqueeze(-1)
    settings = load_settings([f"NUM_EPOCHS=1", "NUM_THREADS=%d" % threads],
                             os.path.join(ROOT, 'params.py'))
    tiny_val = TrialData(x, y, x[:64], y[:64])
    for batch in batches:
        settings.BATCH_SIZE = batch
        variants = {
            'bare loop, original Conv2d AFNet': lambda: bare_epoch(OriginalAFNet(), x4, y, batch),
            'bare loop, ATML Conv1d AFNet': lambda: bare_epoch(AFNet(), x4, y, batch),
            'ATML train_model (1 epoch + 64-seg val)':
                lambda: train_model(AFNet(), tiny_val, 0.002, settings, torch.device('cpu'),
                                    progress=False),
        }
        times = {name: [] for name in variants}
        names = list(variants)
        for r in range(repeats):       # interleaved, order rotated: no variant always runs last
            for name in names[r % len(names):] + names[:r % len(names)]:
                start = time.perf_counter()
                variants[name]()
                times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(t) for name, t in times.items()}
        for name in names:
            report(f"batch {batch}: {name}", med[name], times[name])
        t0, t1, t2 = (med[n] for n in names)
        print(f"   framework overhead vs bare Conv1d loop: {100 * (t2 / t1 - 1):+.1f} %; "
              f"vs original Conv2d loop: {t0 / t2:.2f}x faster", flush=True)


# --------------------------------------------------------------------------- trial
def bench_trial(train, test, repeats, threads):
    from public.data.prepare import prepare_data
    from public.search.trial import run_trial
    settings = load_settings([f"DATA_DIR={train!r}", f"TEST_DIR={test!r}", "NUM_EPOCHS=2",
                              f"NUM_THREADS={threads}", "CACHE_DIR='/tmp/atml-bench-trial-cache'"],
                             os.path.join(ROOT, 'params.py'))
    start = time.perf_counter()
    data = prepare_data(settings, progress=False)
    print(f"\n== one full stage-one trial (AFNet, lr 0.002, 2 epochs)\n{data.summary}")
    report("load data (train + test, cache as found)", time.perf_counter() - start)
    tmp = tempfile.mkdtemp()
    results = []

    def trial():
        results.append(run_trial(lambda: AFNet(), 0.002, data, settings,
                                 os.path.join(tmp, 'trial.onnx'), progress=False))
    t, runs = median_time(trial, repeats)
    r = results[-1]
    report(f"trial: train {len(data.trial.x_train)}, val {len(data.trial.x_val)}, "
           f"test {len(data.x_test)}, export+check+latency", t, runs)
    print(f"   status {r.status}, val {r.val_metrics}, test {r.test_metrics}, "
          f"onnx {r.onnx_bytes} bytes, latency {r.latency_ms:.3f} ms")
    shutil.rmtree(tmp, ignore_errors=True)


def bench_memory(train, test):
    tmp = tempfile.mkdtemp()
    cmd = [sys.executable, os.path.join(ROOT, 'train_multi.py'), '--params',
           os.path.join(ROOT, 'params.py'), f"DATA_DIR={train!r}", f"TEST_DIR={test!r}",
           'NUM_EPOCHS=1', 'LR_MIN=0.002', 'LR_MAX=0.002',
           "CACHE_DIR='/tmp/atml-bench-trial-cache'"]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=tmp, check=True, stdout=subprocess.DEVNULL)
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"\n== train_multi.py, 3 models x 1 lr x 1 epoch on {train}: "
          f"{time.perf_counter() - start:.0f} s, peak RSS {peak_kb / 1024:.0f} MB")
    shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--folder', help='60,000-file folder for the parse benchmark')
    ap.add_argument('--train', help='training folder for the trial/memory benchmarks')
    ap.add_argument('--test', help='test folder (other subjects)')
    ap.add_argument('--only', nargs='*', default=['parse', 'epoch', 'trial', 'memory'])
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--epoch-segments', type=int, default=48000)
    ap.add_argument('--batches', type=int, nargs='*', default=[32, 256])
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--parse-sample', type=int, default=5000)
    a = ap.parse_args()
    print(f"machine: {os.cpu_count()} CPU cores; torch {torch.__version__}; "
          f"load average {os.getloadavg()[0]:.2f}")
    if 'parse' in a.only:
        bench_parse(a.folder, a.repeats, a.parse_sample)
    if 'epoch' in a.only:
        bench_epoch(a.epoch_segments, a.repeats, a.batches, a.threads)
    if 'trial' in a.only:
        bench_trial(a.train, a.test, a.repeats, a.threads)
    if 'memory' in a.only:
        bench_memory(a.train, a.test)


if __name__ == '__main__':
    main()
