"""Recipe levers measured on subjects the model never saw: K folds grouped by subject.

    python bench/bench_recipe.py                                  # the shared 53-subject data
    python bench/bench_recipe.py --folds 5 --seeds 2 --epochs 10 --jobs 16 --out recipe.csv

For each fold, the models train on the other folds' subjects (an inner validation split
of those subjects, by subject, drives early stopping and the best weights, as in ATML)
and are scored on the held-out fold's subjects. Every variant uses the same folds, seeds,
epoch budget and learning rate:
    original   every lever off (the original ATML's recipe)
    augment    AUGMENT=True
    normalize  NORMALIZE='segment'
    weights    CLASS_WEIGHTS='balanced'
    all        the three together
    augment+refit  AUGMENT and REFIT=True: the model is trained again from scratch on all
               training subjects (the inner validation subjects too) for the epoch count
               that validation chose, and that model (the one delivered) is scored
Models (--models): AFNet (stage one's default), ss-c1-f1 (the stage-two AFNet at channel
1, FC 1: 18.3 KB) and SepNet (public/models/small.py, designed for <= 20 KB: 19.4 KB). It prints, per model and variant, the held-out F1 and min-metric
of each fold (median over seeds), their median over folds with the range, the validation
F1 and the validation-to-held-out gap; and the augmentation's share of an epoch. Trials
run in parallel worker processes (one torch thread each). Rows go to --out as CSV.
"""
import argparse
import concurrent.futures as futures
import multiprocessing
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VARIANTS = {
    'original': {},
    'augment': {'AUGMENT': True},
    'normalize': {'NORMALIZE': 'segment'},
    'weights': {'CLASS_WEIGHTS': 'balanced'},
    'all': {'AUGMENT': True, 'NORMALIZE': 'segment', 'CLASS_WEIGHTS': 'balanced'},
    'augment+refit': {'AUGMENT': True, 'REFIT': True},
}
OFF = {'AUGMENT': False, 'NORMALIZE': 'none', 'CLASS_WEIGHTS': 'none'}   # the original recipe
_DATA = {}


def folds_of(subjects, k, seed=0):
    """Subject -> fold (0..k-1): subjects shuffled with a fixed seed, dealt round-robin."""
    unique = np.array(sorted(set(subjects.tolist())))
    order = np.random.default_rng(seed).permutation(len(unique))
    return {unique[i]: n % k for n, i in enumerate(order)}


def _load(path):
    if 'x' not in _DATA:
        d = np.load(path)
        _DATA.update(x=d['x'].astype(np.float32)[:, None, :],
                     y=(d['rhythm'] == 'AFIB').astype(np.int64), subject=d['subject'])
    return _DATA


def _settings(args, variant, seed):
    from public.core.settings import load_settings
    values = dict(NUM_EPOCHS=args.epochs, SEED=seed, DEVICE='cpu', NUM_THREADS=1, WORKERS=1,
                  LATENCY_RUNS=1, BATCH_SIZE=32, TEMP_DIR=os.path.join(args.scratch, 'temp'),
                  TEST_DIR='', **OFF)
    values.update(VARIANTS[variant])
    return load_settings([f"{k}={v!r}" for k, v in values.items()],
                         params_path=os.path.join(ROOT, 'params.py'))


def run_one(args, model_name, variant, fold, seed):
    """Train on the other folds' subjects, score on this fold's: one result row."""
    import torch
    torch.set_num_threads(1)
    from public.dataset import split_by_subject
    from public.test import worst_metric
    from public.data.prepare import TrialData
    from public.data.prepare import PreparedData
    from public.search.trial import run_trial
    d = _load(args.npz)
    assign = folds_of(d['subject'], args.folds)
    held = np.array([assign[s] == fold for s in d['subject']])
    train_idx = np.flatnonzero(~held)
    inner_tr, inner_val = split_by_subject(d['subject'][train_idx], d['y'][train_idx], 0.2, seed)
    tr, va = train_idx[inner_tr], train_idx[inner_val]
    x, y = torch.from_numpy(d['x']), torch.from_numpy(d['y'])
    data = PreparedData(trial=TrialData(x[tr], y[tr], x[va], y[va]),
                        x_test=x[held], y_test=d['y'][held],
                        onnx_sample=d['x'][va[:16]], in_channels=1, input_size=1250,
                        num_classes=2, device=torch.device('cpu'), summary='')
    settings = _settings(args, variant, seed)
    start = time.perf_counter()
    result = run_trial(_builder(model_name), args.lr, data, settings,
                       os.path.join(args.scratch, f"{model_name}-{variant}-{fold}-{seed}-{os.getpid()}.onnx"),
                       progress=False, latency=False)
    row = dict(model=model_name, variant=variant, fold=fold, seed=seed, status=result.status,
               epochs=result.epochs, onnx_bytes=result.onnx_bytes, wall_s=time.perf_counter() - start)
    if result.status != 'ok':
        row['error'] = result.error.strip().splitlines()[-1][:300] if result.error else ''
        print(result.error[-1500:], flush=True)
        return row
    # REFIT (ATML's refit, as run_job does it): the delivered model is the refit one, scored
    # on the same held-out subjects; validation figures stay the validation-chosen model's.
    test = result.test_metrics
    if settings.REFIT:
        from public.search.trial import refit
        test = refit(_builder(model_name), args.lr, result, data, settings,
                     os.path.join(args.scratch, f"{model_name}-{fold}-{seed}-{os.getpid()}.refit.onnx"),
                     progress=False)['test_metrics']
    row.update(val_f1=result.val_metrics['f1'], val_min4=worst_metric(result.val_metrics),
               test_f1=test['f1'], test_min4=worst_metric(test))
    return row


def _builder(model_name):
    import functools
    if model_name == 'AFNet':
        from public.model import AFNet
        return functools.partial(AFNet, input_size=1250, in_channels=1, num_classes=2)
    if model_name == 'SepNet':
        from public.models.small import SepNet
        return functools.partial(SepNet, input_size=1250, in_channels=1, num_classes=2)
    import public.ss_model as ss
    return functools.partial(ss.AFNet, ss.generate_config(1, 1, 1250))


def augmentation_share(epochs=1):
    """Augmentation's share of an AFNet epoch over 4,000 segments (1 thread)."""
    import torch
    from public.train.recipe import Augmenter
    from public.model import AFNet
    torch.set_num_threads(1)
    x = torch.randn(4000, 1, 1250)
    aug = Augmenter(0, 'cpu')
    model = AFNet()
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    t_aug = t_all = 0.0
    for i in range(0, len(x), 32):
        start = time.perf_counter()
        xb = aug(x[i:i + 32])
        t_aug += time.perf_counter() - start
        loss = model(xb.unsqueeze(-1)).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        t_all += time.perf_counter() - start
    return t_aug / t_all


def summarize(rows):
    out = []
    for model in sorted({r['model'] for r in rows}):
        for variant in VARIANTS:
            mine = [r for r in rows if r['model'] == model and r['variant'] == variant
                    and 'test_f1' in r]
            if not mine:
                continue
            folds = sorted({r['fold'] for r in mine})
            per_fold = {k: [statistics.median(r[k] for r in mine if r['fold'] == f) for f in folds]
                        for k in ('test_f1', 'test_min4', 'val_f1')}
            med = {k: statistics.median(v) for k, v in per_fold.items()}
            out.append(dict(model=model, variant=variant, **{f"{k}_median": v for k, v in med.items()},
                            test_f1_range=(min(per_fold['test_f1']), max(per_fold['test_f1'])),
                            gap=med['val_f1'] - med['test_f1'],
                            per_fold_f1=[round(v, 3) for v in per_fold['test_f1']]))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--npz', default=os.path.join(ROOT, '..', 'shared', 'data', 'ecg_af_segments.npz'))
    parser.add_argument('--folds', type=int, default=5)
    parser.add_argument('--seeds', type=int, default=2)
    parser.add_argument('--epochs', type=int, default=10)
    parser.add_argument('--lr', type=float, default=0.003)
    parser.add_argument('--models', default='AFNet,ss-c1-f1')
    parser.add_argument('--variants', default=','.join(VARIANTS))
    parser.add_argument('--jobs', type=int, default=os.cpu_count())
    parser.add_argument('--scratch', default='/tmp/atml-recipe')
    parser.add_argument('--out', default='')
    args = parser.parse_args()
    os.makedirs(os.path.join(args.scratch, 'temp'), exist_ok=True)
    jobs = [(m, v, f, 42 + s) for m in args.models.split(',') for v in args.variants.split(',')
            for f in range(args.folds) for s in range(args.seeds)]
    print(f"bench_recipe: {len(jobs)} trials ({args.folds} subject folds x {args.seeds} seeds x "
          f"{len(args.variants.split(','))} variants x {len(args.models.split(','))} models), "
          f"{args.epochs} epochs, lr {args.lr}; {os.cpu_count()} CPU cores, {args.jobs} workers",
          flush=True)
    print(f"augmentation share of an AFNet epoch (batch 32, 1 thread): {augmentation_share():.1%}",
          flush=True)
    rows, start = [], time.perf_counter()
    spawn = multiprocessing.get_context('spawn')     # no fork after autograd ran here
    with futures.ProcessPoolExecutor(args.jobs, mp_context=spawn) as pool:
        pending = {pool.submit(run_one, args, *job): job for job in jobs}
        for done in futures.as_completed(pending):
            row = done.result()
            rows.append(row)
            print(f"  {row['model']:8} {row['variant']:9} fold {row['fold']} seed {row['seed']}: "
                  f"{row['status']}, held-out F1 {row.get('test_f1', float('nan')):.3f} "
                  f"(val {row.get('val_f1', float('nan')):.3f}), {row['epochs']} epochs, "
                  f"{row['wall_s']:.0f} s", flush=True)
    print(f"all trials: {time.perf_counter() - start:.0f} s")
    print('\nmodel     variant    held-out F1 median [range over folds]  min4 median  val F1  gap   per fold')
    for s in summarize(rows):
        lo, hi = s['test_f1_range']
        print(f"{s['model']:9} {s['variant']:10} {s['test_f1_median']:.3f} [{lo:.3f}-{hi:.3f}]"
              f"{'':18}{s['test_min4_median']:.3f}       {s['val_f1_median']:.3f}  "
              f"{s['gap']:+.3f} {s['per_fold_f1']}")
    if args.out:
        import pandas as pd
        pd.DataFrame(rows).to_csv(args.out, index=False)


if __name__ == '__main__':
    main()
