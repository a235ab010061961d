"""Stage one with SCHEDULER='grid' vs 'halving' on a real-scale folder: wall time, epochs
trained, and the best trial each finds per model (validation and held-out subjects).

    python bench/bench_halving.py                     # writes /tmp/bench-50k/{train,test} first
    python bench/bench_halving.py --models AFNet,OptimizedAFNet,ShuffleNetV2 --runs 2 --epochs 30

The folders come from ../shared/data/ecg_af_train_50k.npz (all 50,000 segments of the 53
subjects): the 13 test subjects of bench/real_data.py form the test folder (held out: never
trained on nor selected on), the other 40 the training folder (ATML splits 20 % of them off
for validation, by subject). Each run is `python train_multi.py` as a user runs it, in a fresh
scratch project, with params.py's defaults (grid LR_MIN..LR_MAX by STEP: 8 rates; AVOID_PARAM,
STAGE1_TARGET, WORKERS='auto') and NUM_EPOCHS; the data cache is warmed once before the timed
runs. Runs alternate grid / halving (halving first in every other pair). Printed: the
machine's cores and CPU, each run's wall, trials and epochs trained, per model the best
learning rate with its validation and test score; then medians, the halving/grid wall
ratio, and whether halving found each model's grid answer or how far its held-out F1 is.
"""
import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'bench'))
from real_data import TEST_SUBJECTS, cpu_name, cpu_vnni  # noqa: E402

NPZ = os.path.join(ROOT, '..', 'shared', 'data', 'ecg_af_train_50k.npz')
TOOL = os.path.join(ROOT, '..', 'shared', 'tools', 'npz_to_txt.py')


# --models SepNet: public/models/small.py's SepNet (registered there) added to the scratch
# project's public/model.py (19.4 KB; a third model as cheap as AFNet: ShuffleNetV2's trials cost
# several times an AFNet's, too many for this 2-core benchmark)
SEPNET = '''

import public.models.small  # noqa: E402,F401  (bench_halving: registers its SepNet)

model_classes = _registered()
'''


def write_folders(npz, out):
    """train/ and test/ under out, from the npz (skipped when they are there already)."""
    import numpy as np
    subjects = sorted(set(np.load(npz)['subject'].tolist()))
    train = [s for s in subjects if s not in TEST_SUBJECTS]
    for name, chosen in (('train', train), ('test', list(TEST_SUBJECTS))):
        folder = os.path.join(out, name)
        if not os.path.isdir(folder):
            subprocess.run([sys.executable, TOOL, folder + '.tmp', '--npz', npz,
                            '--subjects', ','.join(chosen)], check=True)
            os.rename(folder + '.tmp', folder)
    return os.path.join(out, 'train'), os.path.join(out, 'test')


def project(args, scheduler):
    folder = tempfile.mkdtemp(prefix=f'atml-halving-{scheduler}-')
    for name in ('train_multi.py', 'params.py', 'public'):
        src = os.path.join(ROOT, name)
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, os.path.join(folder, name))
    overrides = dict(DATA_DIR=args.train, TEST_DIR=args.test, CACHE_DIR=args.cache,
                     MODELS=tuple(args.models.split(',')), NUM_EPOCHS=args.epochs,
                     SCHEDULER=scheduler, LATENCY_RUNS=50)
    with open(os.path.join(folder, 'params.py'), 'a') as f:
        f.write('\n' + ''.join(f"{k} = {v!r}\n" for k, v in overrides.items()))
    if 'SepNet' in args.models.split(','):
        with open(os.path.join(folder, 'public', 'model.py'), 'a') as f:
            f.write(SEPNET)
    return folder


def timed_run(args, scheduler, keep):
    folder = project(args, scheduler)
    log_path = os.path.join(folder, 'run.log')
    start = time.perf_counter()
    with open(log_path, 'w') as log:
        code = subprocess.call([sys.executable, 'train_multi.py'], cwd=folder, stdout=log,
                               stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    text = open(log_path).read()
    if code != 0:
        raise SystemExit(f"run failed ({folder}):\n{text[-3000:]}")
    with open(os.path.join(folder, 'multi-result', 'summary.csv'), newline='') as f:
        summary = {r['model']: r for r in csv.DictReader(f)}
    if keep:
        os.makedirs(keep, exist_ok=True)
        stamp = time.strftime('%H%M%S')
        shutil.copy(log_path, os.path.join(keep, f"{scheduler}-{stamp}.log"))
        shutil.copy(os.path.join(folder, 'multi-result', 'results.csv'),
                    os.path.join(keep, f"{scheduler}-{stamp}-results.csv"))
    shutil.rmtree(folder)
    return dict(wall=wall, summary=summary,
                trials=sum(int(r['trials']) for r in summary.values()),
                epochs=sum(int(r['epochs_trained']) for r in summary.values()))


def _f(value, digits=4):
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return '-'


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--npz', default=NPZ)
    parser.add_argument('--data', default='/tmp/bench-50k', help='where train/ and test/ are written')
    parser.add_argument('--models', default='AFNet,OptimizedAFNet,SepNet')
    parser.add_argument('--epochs', type=int, default=30)
    parser.add_argument('--runs', type=int, default=2, help='runs per scheduler, interleaved')
    parser.add_argument('--keep', default='', help='copy each run log and results.csv here')
    parser.add_argument('--schedulers', default='grid,halving',
                        help="which to run (e.g. 'halving' alone, against an earlier grid run)")
    parser.add_argument('--halving-first', action='store_true',
                        help='start with halving (a second pair run on its own, interleaved)')
    args = parser.parse_args()
    args.train, args.test = write_folders(args.npz, args.data)
    args.cache = os.path.join(args.data, '.atml-cache')
    print(f"bench_halving: {args.models} x params.py's 8 rates, NUM_EPOCHS={args.epochs}, "
          f"WORKERS='auto'; train {args.train} ({len(os.listdir(args.train))} files), test "
          f"{args.test} ({len(os.listdir(args.test))} files); {os.cpu_count()} CPU cores, "
          f"{cpu_name()} ({cpu_vnni() or 'no VNNI'}); {args.runs} run(s) each, interleaved",
          flush=True)
    folder = project(args, 'grid')                # parse once into the cache
    subprocess.run([sys.executable, '-c', 'from public.core.settings import load_settings; '
                    'from public.data.prepare import prepare_data; '
                    'print(prepare_data(load_settings([]), progress=False).summary)'],
                   cwd=folder, check=True)
    shutil.rmtree(folder)
    results = {'grid': [], 'halving': []}
    for i in range(args.runs):
        for scheduler in (('grid', 'halving') if (i + args.halving_first) % 2 == 0
                          else ('halving', 'grid')):
            if scheduler not in args.schedulers.split(','):
                continue
            r = timed_run(args, scheduler, args.keep)
            results[scheduler].append(r)
            print(f"  run {i + 1} {scheduler:7}: wall {r['wall']:7.1f} s, {r['trials']} trials, "
                  f"{r['epochs']} epochs trained", flush=True)
            for model, s in r['summary'].items():
                print(f"      {model:15} best lr {s.get('best_lr', '-'):7} val {s.get('result', '-'):6} "
                      f"score {_f(s.get('score'))}  test F1 {_f(s.get('test_f1'))}  "
                      f"test min4 {_f(min((float(s[k]) for k in ('test_f1', 'test_accuracy', 'test_precision', 'test_recall') if s.get(k)), default=None))}  "
                      f"trials {s['trials']} stopped {s.get('stopped', 0)} epochs {s['epochs_trained']}",
                      flush=True)
    results = {k: rs for k, rs in results.items() if rs}
    if len(results) < 2:
        return
    med = {k: {m: statistics.median(r[m] for r in rs) for m in ('wall', 'epochs', 'trials')}
           for k, rs in results.items()}
    for k in results:
        print(f"median {k:7}: wall {med[k]['wall']:.1f} s {[round(r['wall'], 1) for r in results[k]]}, "
              f"epochs {med[k]['epochs']:.0f}, trials {med[k]['trials']:.0f}")
    print(f"halving/grid wall = {med['halving']['wall'] / med['grid']['wall']:.2f}, "
          f"epochs = {med['halving']['epochs'] / med['grid']['epochs']:.2f} "
          f"on {os.cpu_count()} cores")
    for model in args.models.split(','):
        grid = [r['summary'][model] for r in results['grid']]
        halving = [r['summary'][model] for r in results['halving']]
        same = [g.get('best_lr') == h.get('best_lr') for g, h in zip(grid, halving)]
        gap = [float(h['test_f1']) - float(g['test_f1']) for g, h in zip(grid, halving)
               if g.get('test_f1') and h.get('test_f1')]
        print(f"  {model:15} same best lr as the grid: {sum(same)}/{len(same)}; held-out F1 "
              f"halving - grid: {', '.join(f'{100 * d:+.2f}' for d in gap)} points")


if __name__ == '__main__':
    main()
