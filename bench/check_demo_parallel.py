"""The real demo, parallel vs serial: one answer whatever the timing (issue 15).

    python bench/check_demo_parallel.py                  # stage one + stage two, 3 parallel runs
    python bench/check_demo_parallel.py --runs 3 NUM_EPOCHS=3 LR_MIN=0.0015 LR_MAX=0.003

Each run is a fresh copy of this project (code, params.py, avoid.txt, ttdata/) where
`python train_multi.py` and then `python train_final.py` run as a user runs them, with the
given KEY=VALUE overrides, once with WORKERS=1 and `--runs` times with WORKERS='auto'.
Then it compares, for stage one, results.csv (the serial rows; timing columns and
'speculative' rows left out), avoid.txt, the best folders (names and saved.pth) and
summary.csv (wall_s left out), and for stage two the serial rows of stage2_results.csv and
the result folder (name and saved.pth). Prints the speculative work of each parallel run
and exits 1 if any parallel run differs from the serial one. Too long for the test suite
(several minutes on 2 cores): the suite's version is tests/test_serial_order.py (random
completion orders) and tests/test_parallel.py (real Ray, small data).
"""
import csv
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPY = ('public', 'train_multi.py', 'train_final.py', 'params.py', 'avoid.txt', 'ttdata')
TIMING = ('latency_ms', 'wall_s', 'finished_at', 'node', 'attempts')
SNAPSHOT = [None]


def _project(source=None):
    """A fresh copy of the project (of `source`, a snapshot made at the start, so that
    edits made while the check runs do not change what it runs)."""
    folder = tempfile.mkdtemp(prefix='atml-demo-')
    for name in COPY:
        src = os.path.join(source or SNAPSHOT[0] or ROOT, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(folder, name),
                            ignore=shutil.ignore_patterns('__pycache__', '.atml-cache'))
        elif os.path.exists(src):
            shutil.copy(src, os.path.join(folder, name))
    return folder


def _rows(path):
    if not os.path.exists(path):
        return []
    with open(path, newline='') as f:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)
                if r.get('status') != 'speculative']


def _state(path):
    import torch
    return {k: v.tolist() for k, v in torch.load(path, weights_only=True).items()}


def _answer(folder):
    root = os.path.join(folder, 'multi-result')
    best = {}
    for model in sorted(os.listdir(root)):
        model_dir = os.path.join(root, model)
        if not os.path.isdir(model_dir) or model.startswith('.'):
            continue
        for entry in sorted(os.listdir(model_dir)):
            if re.fullmatch(r'\d{1,3}-\d{1,3}', entry):
                best[(model, entry)] = _state(os.path.join(model_dir, entry, 'saved.pth'))
    with open(os.path.join(root, 'summary.csv'), newline='') as f:
        summary = [{k: v.replace(folder, '<project>') for k, v in r.items()
                    if k not in ('wall_s', 'latency_ms')}    # timing: measured, not decided
                   for r in csv.DictReader(f)]
    final = [e for e in os.listdir(folder) if re.fullmatch(r'\d{1,3}-\d{1,3}', e)]
    return dict(
        rows=_rows(os.path.join(root, 'results.csv')),
        avoid=open(os.path.join(folder, 'avoid.txt')).read(),
        best=best, summary=summary,
        stage2_rows=_rows(os.path.join(folder, 'temp', 'stage2_results.csv')),
        stage2=({e: _state(os.path.join(folder, e, 'saved.pth')) for e in final}))


def _run(overrides, workers):
    folder = _project()
    args = [f"WORKERS={workers!r}", *overrides]
    logs, start = [], time.perf_counter()
    for script in ('train_multi.py', 'train_final.py'):
        proc = subprocess.run([sys.executable, script, *args], cwd=folder, capture_output=True,
                              text=True)
        logs.append(proc.stdout + proc.stderr)
        if proc.returncode not in (0, 3):       # 3: stage two met no target (still an answer)
            raise SystemExit(f"{script} {' '.join(args)} failed in {folder}:\n{logs[-1][-3000:]}")
    wall = time.perf_counter() - start
    speculative = re.findall(r'Speculative work: .*', '\n'.join(logs))
    answer = _answer(folder)
    shutil.rmtree(folder)
    return answer, wall, speculative


def main(argv):
    runs = 3
    if argv[:1] == ['--runs']:
        runs, argv = int(argv[1]), argv[2:]
    SNAPSHOT[0] = _project(ROOT)
    print(f"check_demo_parallel: {os.cpu_count()} CPU cores; overrides {argv or 'none'}; "
          f"1 serial run, {runs} parallel", flush=True)
    serial, wall, _ = _run(argv, 1)
    print(f"  WORKERS=1: {wall:.0f} s; stage one {len(serial['rows'])} rows, best "
          f"{sorted(f'{m}/{f}' for m, f in serial['best'])}; stage two {sorted(serial['stage2'])}",
          flush=True)
    same = True
    for i in range(runs):
        got, wall, speculative = _run(argv, 'auto')
        differ = [part for part in serial if got[part] != serial[part]]
        same &= not differ
        for part in differ:
            if isinstance(serial[part], list):
                print(f"    {part}: serial {[r for r in serial[part] if r not in got[part]]}\n"
                      f"    {part}: parallel {[r for r in got[part] if r not in serial[part]]}")
        print(f"  WORKERS='auto' run {i + 1}: {wall:.0f} s; "
              f"{'identical' if not differ else 'DIFFERS in ' + ', '.join(differ)}; "
              f"{'; '.join(speculative) or 'no speculative work'}", flush=True)
    print('every parallel run equals the serial run' if same else 'MISMATCH')
    return 0 if same else 1


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
