"""Stage one serial (WORKERS=1) vs parallel (WORKERS='auto', Ray) on a real-scale folder.

    python tools/../bench/bench_parallel.py --train /tmp/bench-data/train --test /tmp/bench-data/test
    python bench/bench_parallel.py --demo            # the demo's stage one both ways

Make the folders from the shared real data (40 subjects x 3 repeats for training, the other
13 subjects for testing):
    python ../shared/tools/npz_to_txt.py /tmp/bench-data/train --subjects S0,S1,... --repeat 3
    python ../shared/tools/npz_to_txt.py /tmp/bench-data/test --subjects S51,...

Each run is `python train_multi.py` as a user runs it, in a fresh scratch project (the data
cache is warmed once before the timed runs), with every trial forced to run in both modes
(AVOID_PARAM=0, STAGE1_TARGET=100) so that both do the same work; `--pruning` keeps
params.py's AVOID_PARAM and STAGE1_TARGET instead, so that results prune rates and end
models, and the parallel search runs some trials ahead of the serial order that it then
does not use (speculative work: its trials and worker seconds are printed; both modes must
record the same serial rows, which is checked). Runs alternate serial / parallel. For each run it prints the wall time, Ray's start-up (from the run's log), the
sum of the trials' own wall times, and the peak memory of the whole process tree (driver,
Ray's processes and workers) sampled every 0.5 s as PSS (shared pages split between the
processes that map them) and as RSS (shared pages counted in every process). Then the
medians, the parallel/serial ratio and the machine's core count.
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _children(pid):
    kids = {}
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open(f'/proc/{entry}/stat') as f:
                    ppid = int(f.read().rsplit(')', 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += kids.get(p, [])
    return tree


def _memory_kb(pid, field):
    try:
        with open(f'/proc/{pid}/smaps_rollup') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakMemory(threading.Thread):
    """Peak PSS and RSS (MB) of a process tree, sampled every 0.5 s."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.pss, self.rss, self.procs, self.done = pid, 0.0, 0.0, 0, False

    def run(self):
        while not self.done:
            tree = _children(self.pid)
            self.pss = max(self.pss, sum(_memory_kb(p, 'Pss') for p in tree) / 1024)
            self.rss = max(self.rss, sum(_memory_kb(p, 'Rss') for p in tree) / 1024)
            self.procs = max(self.procs, len(tree))
            time.sleep(0.5)


def project(args, workers):
    folder = tempfile.mkdtemp(prefix='atml-bench-')
    for name in ('public', 'train_multi.py', 'params.py'):
        src = os.path.join(ROOT, name)
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, os.path.join(folder, name))
    if args.demo:
        shutil.copytree(os.path.join(ROOT, 'ttdata'), os.path.join(folder, 'ttdata'))
        overrides = dict(WORKERS=workers)
    else:
        overrides = dict(DATA_DIR=args.train, TEST_DIR=args.test, CACHE_DIR=args.cache,
                         MODELS=tuple(args.models.split(',')), NUM_EPOCHS=args.epochs,
                         LR_MIN=0.0015, LR_MAX=0.0015 + 0.0005 * (args.lrs - 1), STEP=0.0005,
                         WORKERS=workers, LATENCY_RUNS=50)
        if not args.pruning:
            overrides.update(AVOID_PARAM=0.0, STAGE1_TARGET=100)
        overrides.update(args.set)
    with open(os.path.join(folder, 'params.py'), 'a') as f:
        f.write('\n' + ''.join(f"{k} = {v!r}\n" for k, v in overrides.items()))
    return folder


def timed_run(args, workers):
    folder = project(args, workers)
    log_path = os.path.join(folder, 'run.log')
    start = time.perf_counter()
    with open(log_path, 'w') as log:
        proc = subprocess.Popen([sys.executable, 'train_multi.py'], cwd=folder, stdout=log,
                                stderr=subprocess.STDOUT)
        peak = PeakMemory(proc.pid)
        peak.start()
        proc.wait()
        peak.done = True
    wall = time.perf_counter() - start
    text = open(log_path).read()
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({folder}):\n{text[-3000:]}")
    ray = re.search(r'\(([\d.]+) s to start\)', text)
    trials = [float(s) for s in re.findall(r', ([\d.]+) s(?: on node \w+)?\n', text)]
    spec = re.search(r'Speculative work: (\d+) trial\(s\).*?\(([\d.]+) s of worker time.*?'
                     r'(\d+) running trial\(s\) cancelled', text)
    rows = _serial_rows(os.path.join(folder, 'multi-result', 'results.csv'))
    shutil.rmtree(folder)
    return dict(wall=wall, ray=float(ray.group(1)) if ray else 0.0, trials=len(trials),
                trial_s=sum(trials), pss=peak.pss, rss=peak.rss, procs=peak.procs,
                spec=int(spec.group(1)) if spec else 0, spec_s=float(spec.group(2)) if spec else 0.0,
                cancelled=int(spec.group(3)) if spec else 0, rows=rows)


def _serial_rows(path):
    """The rows the serial search records (timing columns and speculative rows left out)."""
    import csv
    if not os.path.exists(path):
        return []
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    timing = ('latency_ms', 'wall_s', 'finished_at', 'node', 'attempts')
    return [{k: v for k, v in r.items() if k not in timing} for r in rows
            if r.get('status') != 'speculative']


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--train', default='/tmp/bench-data/train')
    parser.add_argument('--test', default='/tmp/bench-data/test')
    parser.add_argument('--cache', default='/tmp/bench-data/.atml-cache')
    parser.add_argument('--models', default='AFNet,ShuffleNetV2,OptimizedAFNet')
    parser.add_argument('--lrs', type=int, default=4)
    parser.add_argument('--epochs', type=int, default=2)
    parser.add_argument('--runs', type=int, default=3)
    parser.add_argument('--demo', action='store_true', help="the demo's stage one instead")
    parser.add_argument('--pruning', action='store_true',
                        help="keep params.py's AVOID_PARAM and STAGE1_TARGET (speculative work)")
    parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                        help='another setting for both modes (a Python literal), e.g. AVOID_PARAM=0.9')
    args = parser.parse_args()
    import ast
    args.set = dict((kv.split('=', 1)[0], ast.literal_eval(kv.split('=', 1)[1])) for kv in args.set)
    what = 'demo (ttdata/)' if args.demo else (
        f"{args.models} x {args.lrs} lr x {args.epochs} epoch(s), train {args.train}")
    sys.path.insert(0, os.path.join(ROOT, 'bench'))
    from real_data import cpu_name, cpu_vnni
    print(f"bench_parallel: {what}{' (pruning on)' if args.pruning else ''} {args.set or ''}; "
          f"{os.cpu_count()} CPU cores, {cpu_name()} ({cpu_vnni() or 'no VNNI'}); "
          f"{args.runs} run(s) per mode, interleaved", flush=True)
    if not args.demo:                  # parse once into the cache: the runs time training
        folder = project(args, 1)
        subprocess.run([sys.executable, '-c', 'from public.core.settings import load_settings; '
                        'from public.data.prepare import prepare_data; '
                        'print(prepare_data(load_settings([]), progress=False).summary)'],
                       cwd=folder, check=True)
        shutil.rmtree(folder)
    results = {1: [], 'auto': []}
    for i in range(args.runs):
        for workers in (1, 'auto'):
            r = timed_run(args, workers)
            results[workers].append(r)
            print(f"  run {i + 1} WORKERS={workers!r:6}: wall {r['wall']:7.1f} s, Ray start "
                  f"{r['ray']:4.1f} s, {r['trials']} trials ({r['trial_s']:.1f} s of trial time), "
                  f"peak PSS {r['pss']:6.0f} MB / RSS {r['rss']:6.0f} MB over {r['procs']} "
                  f"processes" + (f"; speculative {r['spec']} trial(s) {r['spec_s']:.0f} s, "
                                  f"{r['cancelled']} cancelled" if workers != 1 else ''),
                  flush=True)
    reference = results[1][0]['rows']
    same = all(r['rows'] == reference for rs in results.values() for r in rs)
    print(f"serial rows identical in every run of both modes: {same} "
          f"({len(reference)} rows)")
    med = {w: {k: statistics.median(r[k] for r in rs)
               for k in ('wall', 'ray', 'pss', 'rss', 'spec_s', 'trial_s')}
           for w, rs in results.items()}
    print(f"median speculative worker time {med['auto']['spec_s']:.0f} s of "
          f"{med['auto']['trial_s'] + med['auto']['spec_s']:.0f} s of trial time "
          f"({100 * med['auto']['spec_s'] / max(1e-9, med['auto']['trial_s'] + med['auto']['spec_s']):.0f} %)")
    walls = {w: [round(r['wall'], 1) for r in rs] for w, rs in results.items()}
    print(f"median wall: serial {med[1]['wall']:.1f} s {walls[1]}, parallel "
          f"{med['auto']['wall']:.1f} s {walls['auto']}; parallel/serial = "
          f"{med['auto']['wall'] / med[1]['wall']:.2f} on {os.cpu_count()} cores")
    workers = os.cpu_count()
    print(f"median Ray start-up {med['auto']['ray']:.1f} s; median peak PSS serial "
          f"{med[1]['pss']:.0f} MB, parallel {med['auto']['pss']:.0f} MB "
          f"({med['auto']['pss'] / workers:.0f} MB per worker with {workers} workers); "
          f"RSS {med[1]['rss']:.0f} / {med['auto']['rss']:.0f} MB")


if __name__ == '__main__':
    main()
