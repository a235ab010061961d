"""Stage-two architectures measured on what stage two delivers, on subjects never seen.

    python bench/bench_ss_arch.py                       # 5 folds x 3 seeds x 3 arms
    python bench/bench_ss_arch.py --folds 5 --seeds 3 --epochs 8 --jobs 2 --out arch.csv
    python bench/bench_ss_arch.py --arms 'budget,budget+AUGMENT=False,afnet+AUGMENT=True'
    python bench/bench_ss_arch.py --arms "budget+DISTILL_FROM='fold';budget+AUGMENT=('flip',)"
    python bench/bench_ss_arch.py --summarize arch.csv     # the summary of a (partial) run
    python bench/bench_ss_arch.py --summarize run1.csv,run2.csv    # two runs' arms together

Arms (--arms, separated by commas, or by ';' when a value holds a comma): an architecture, optionally followed by settings that
override params.py's, each '+NAME=VALUE' (a Python literal). Architectures: 'budget'
(public/ss_model.py: the budget-native BudgetNet of public/models/budget.py, the default
since issue 20) and 'afnet' (examples/ss_model_afnet.py: the AFNet width scaling that was
the default before). Each is put in place of public/ss_model.py in the worker
(sys.modules), so the stage-two machinery itself builds, trains and quantizes it. Jobs run
fold by fold, seed by seed, all arms of one (fold, seed) together, so a partial run is a
paired comparison.

Distillation: an arm with '+DISTILL_FROM=\'fold\'' distils from a teacher of its fold.
Before the students, one teacher per fold (--teacher, stage one's registered model, default
AFNet, 88 KB) trains on that fold's training subjects (inner split of seed 42, lr --lr,
--epochs, params.py's recipe) and its saved.onnx goes to <scratch>/teacher-f<fold>/; each
student then sets DISTILL_FROM to that folder and attaches the teacher's logits as stage two
does (public.search.teacher.attach_teacher, cached in <scratch>/cache/teacher). The teacher
never sees the held-out fold (it may have seen another seed's inner validation subjects).
Its own held-out scores are printed and written to <out>.teachers.csv.

A calibrated decision threshold is scored for free on every trial (columns cal_*): the
threshold that maximises SELECT_METRIC on the inner validation split, from the INT8 file's
own validation probabilities (public.train.threshold.pick_threshold), applied to the
held-out subjects. CALIBRATE_THRESHOLD=True picks it on the float model and folds it into
the bias before quantizing; training is the same either way (calibration comes after it).

Stage two's settings: QUANTIZE_INT8=True, SIZE_TARGET_KB (20), LEARNING_RATE (--lr),
NUM_EPOCHS (--epochs), the other settings params.py's defaults. The candidate grid of
each architecture (CHANNEL_SCALES x FC_SCALES) is planned with
public.search.stage_two.plan_candidates (exact INT8 sizes before training) and printed.

Which candidate is trained: by default (--pick largest) only the LARGEST candidate whose
INT8 file is <= SIZE_TARGET_KB. That is what stage two delivers when no smaller candidate
meets METRIC_TARGET (it then publishes the best under the size cap, usually the largest):
a cheap proxy for the delivered model, not the whole smallest-first search. --pick c2-f3
trains a named candidate instead.

For each fold (subjects dealt into --folds folds, bench_recipe.folds_of) and seed, the
candidate trains on the other folds' subjects with an inner subject-grouped validation
split (VAL_FRACTION of them) that drives early stopping and the best weights, through
public.search.trial.run_trial_job (the stage-two job: train, export, INT8 as stage two
quantizes it). The INT8 file is scored on the held-out fold's subjects: F1, the median
over subjects of their F-beta (FBETA_BETA=2, NO_AF_SUBJECT's rule), and the share of
subjects with F-beta > 0.9 (GEN_THRESHOLD: the contest's G). --train-frac keeps that
share of every training subject's segments (seeded; the held-out fold is always whole).
Trials run in worker processes with one torch thread each (--jobs). Rows go to --out.
"""
import argparse
import concurrent.futures as futures
import functools
import importlib.util
import multiprocessing
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'bench'))

from bench_recipe import folds_of        # noqa: E402

ARCHS = {'budget': 'public/ss_model.py', 'afnet': 'examples/ss_model_afnet.py'}
_DATA = {}


def use_arch(arch):
    """Make ARCHS[arch] stage two's public/ss_model.py in this process."""
    import public
    spec = importlib.util.spec_from_file_location('public.ss_model',
                                                  os.path.join(ROOT, ARCHS[arch]))
    module = importlib.util.module_from_spec(spec)
    sys.modules['public.ss_model'] = module
    spec.loader.exec_module(module)
    public.ss_model = module
    return module


def _load(path):
    if 'x' not in _DATA:
        d = np.load(path)
        _DATA.update(x=d['x'].astype(np.float32)[:, None, :],
                     y=(d['rhythm'] == 'AFIB').astype(np.int64), subject=d['subject'])
    return _DATA


def parse_arm(arm):
    """'budget+AUGMENT=False' -> ('budget', ['AUGMENT=False'])."""
    arch, *overrides = arm.split('+')
    if arch not in ARCHS:
        raise SystemExit(f"--arms: unknown architecture {arch!r} in {arm!r} "
                         f"(known: {', '.join(ARCHS)})")
    for o in overrides:
        if '=' not in o:
            raise SystemExit(f"--arms: {o!r} in {arm!r} is not NAME=VALUE")
    return arch, overrides


def settings_of(args, seed, overrides=()):
    from public.core.settings import load_settings
    values = dict(NUM_EPOCHS=args.epochs, SEED=seed, DEVICE='cpu', NUM_THREADS=1, WORKERS=1,
                  LATENCY_RUNS=1, TEMP_DIR=os.path.join(args.scratch, 'temp'), TEST_DIR='',
                  QUANTIZE_INT8=True, SIZE_TARGET_KB=args.size_kb, LEARNING_RATE=args.lr)
    return load_settings([f"{k}={v!r}" for k, v in values.items()] + list(overrides),
                         params_path=os.path.join(ROOT, 'params.py'))


def _subsample(idx, subjects, frac, seed):
    """That share of each subject's segments among idx (seeded), at least one each."""
    if frac >= 1:
        return idx
    rng = np.random.default_rng(seed)
    keep = []
    for s in np.unique(subjects[idx]):
        mine = idx[subjects[idx] == s]
        keep.append(rng.permutation(mine)[:max(1, round(frac * len(mine)))])
    return np.sort(np.concatenate(keep))


def fold_data(args, fold, seed, settings):
    """PreparedData: train / inner validation from the other folds' subjects, test = fold."""
    import torch
    from public.data.loading import split_by_subject
    from public.data.prepare import PreparedData, TrialData
    d = _load(args.npz)
    assign = folds_of(d['subject'], args.folds)
    held = np.flatnonzero([assign[s] == fold for s in d['subject']])
    rest = np.setdiff1d(np.arange(len(d['y'])), held)
    rest = _subsample(rest, d['subject'], args.train_frac, seed)
    inner_tr, inner_val = split_by_subject(d['subject'][rest], d['y'][rest],
                                           settings.VAL_FRACTION, seed)
    tr, va = rest[inner_tr], rest[inner_val]
    x, y = torch.from_numpy(d['x']), torch.from_numpy(d['y'])
    return PreparedData(trial=TrialData(x[tr], y[tr], x[va], y[va]), x_test=x[held],
                        y_test=d['y'][held], onnx_sample=d['x'][va[:16]], in_channels=1,
                        input_size=d['x'].shape[2], num_classes=2,
                        device=torch.device('cpu'), summary='',
                        val_subjects=d['subject'][va], test_subjects=d['subject'][held])


def plan(args, arch):
    """Stage two's plan of this architecture (INT8 sizes, calibrated on fold 0's data)."""
    import torch
    from public.data.prepare import calibration_sample
    from public.search.stage_two import SizeBudget, plan_candidates
    torch.set_num_threads(1)
    use_arch(arch)
    settings = settings_of(args, 42)
    data = fold_data(args, 0, 42, settings)
    probe_dir = os.path.join(args.scratch, f"plan-{arch}")
    candidates = plan_candidates(settings, data.input_size, 1, 2, probe_dir=probe_dir,
                                 calibration_x=calibration_sample(data))
    budget = SizeBudget(settings.SIZE_TARGET_KB)
    return [(k.name, k.config, k.predicted_bytes, budget.fits(k.predicted_bytes))
            for k in candidates]


def pick(candidates, how):
    """The candidate to train: the largest that fits (--pick largest) or a named one."""
    if how == 'largest':
        fitting = [k for k in candidates if k[3]]
        if not fitting:
            raise SystemExit("no candidate fits the size target")
        return max(fitting, key=lambda k: k[2])
    return next(k for k in candidates if k[0] == how)


def held_out_scores(pred, data, settings, prefix=''):
    """F1, per-subject F-beta median and G of decisions pred on the held-out subjects."""
    from public.train import contest
    from public.train.metrics import binary_metrics
    rows = contest.per_subject(data.y_test, pred, data.test_subjects, settings.FBETA_BETA,
                               settings.NO_AF_SUBJECT)
    fb = [r['fbeta'] for r in rows if r['fbeta'] is not None]
    out = dict(test_f1=binary_metrics(data.y_test, pred)['f1'],
               subj_fbeta_median=statistics.median(fb), subj_fbeta_mean=statistics.mean(fb),
               gen=contest.generalisation(rows, 'fbeta', settings.GEN_THRESHOLD),
               subjects=len(fb))
    return {prefix + k: v for k, v in out.items()}


def int8_scores(int8_onnx, data, settings, path):
    """The INT8 file's held-out scores at its own decision (argmax), and at the threshold
    calibrated on the inner validation split from its validation probabilities (cal_*)."""
    from public.compress.export import onnx_predict
    from public.train.metrics import Scoring, probabilities
    from public.train.threshold import pick_threshold
    with open(path, 'wb') as f:
        f.write(int8_onnx)
    try:
        test_logits = onnx_predict(path, data.x_test.numpy())
        val_logits = onnx_predict(path, data.trial.x_val.numpy())
    finally:
        os.remove(path)
    out = held_out_scores(test_logits.argmax(1), data, settings)
    t = pick_threshold(probabilities(val_logits), data.trial.y_val.numpy(),
                       settings.SELECT_METRIC, data.val_subjects, Scoring.of(settings))
    p1 = probabilities(test_logits)[:, 1]
    out.update(held_out_scores((p1 > t).astype(np.int64), data, settings, 'cal_'),
               cal_threshold=t)
    return out


def teacher_dir(args, fold):
    return os.path.join(args.scratch, f"teacher-f{fold}")


def run_teacher(args, fold):
    """The fold's distillation teacher: stage one's --teacher model, trained on the fold's
    training subjects; its saved.onnx in teacher_dir. Reused when it is there already."""
    import torch
    torch.set_num_threads(1)
    import public.model          # noqa: F401  (registers public/model.py's models)
    from public.models.registry import get_model_class
    from public.search.stage_one import _build
    from public.search.trial import TrialSpec, run_trial_job
    settings = settings_of(args, 42, ['QUANTIZE_INT8=False'])
    data = fold_data(args, fold, 42, settings)
    folder = teacher_dir(args, fold)
    start = time.perf_counter()
    if os.path.isfile(os.path.join(folder, 'saved.onnx')):
        return dict(teacher=args.teacher, fold=fold, status='reused', wall_s=0.0)
    spec = TrialSpec(key=f"{args.teacher}@{args.lr}", lr=args.lr, settings=settings,
                     build=functools.partial(_build, get_model_class(args.teacher),
                                             data.input_size, 1, 2))
    result = run_trial_job(spec, data)
    row = dict(teacher=args.teacher, fold=fold, status=result.status, epochs=result.epochs)
    if result.status == 'ok':
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, 'saved.onnx')
        with open(path + '.part', 'wb') as f:
            f.write(result.onnx)
        os.replace(path + '.part', path)
        from public.compress.export import onnx_predict
        pred = onnx_predict(path, data.x_test.numpy()).argmax(1)
        row.update(onnx_kb=result.onnx_bytes / 1024, **held_out_scores(pred, data, settings))
    else:
        row['error'] = (result.error or '').strip().splitlines()[-1][:300]
    return dict(row, wall_s=time.perf_counter() - start)


def run_one(args, arm, name, config, fold, seed):
    """One stage-two trial of one arm's candidate on one fold and seed: one result row."""
    import torch
    torch.set_num_threads(1)
    arch, overrides = parse_arm(arm)
    use_arch(arch)
    from public.search.stage_two import build_from_config
    from public.search.trial import TrialSpec, run_trial_job
    overrides = [f"DISTILL_FROM={teacher_dir(args, fold)!r}" if o == "DISTILL_FROM='fold'"
                 else o for o in overrides]
    if any(o.startswith('DISTILL_FROM=') for o in overrides):
        overrides.append(f"CACHE_DIR={os.path.join(args.scratch, 'cache')!r}")
    settings = settings_of(args, seed, overrides)
    data = fold_data(args, fold, seed, settings)
    start = time.perf_counter()
    from public.search.teacher import attach_teacher
    attach_teacher(settings, data, lambda line: None)
    spec = TrialSpec(key=name, build=functools.partial(build_from_config, config),
                     lr=args.lr, settings=settings, quantize=True)
    result = run_trial_job(spec, data)
    row = dict(arch=arm, candidate=name, fold=fold, seed=seed, status=result.status,
               epochs=result.epochs, best_epoch=result.best_epoch, train=len(data.trial.y_train),
               val=len(data.trial.y_val), test=len(data.y_test), params=result.params)
    if result.status != 'ok':
        row['error'] = (result.error or '').strip().splitlines()[-1][:300]
        print((result.error or '')[-1500:], flush=True)
        return dict(row, wall_s=time.perf_counter() - start)
    row.update(int8_bytes=result.int8['bytes'], float_bytes=result.onnx_bytes,
               fits=result.int8['bytes'] <= int(args.size_kb * 1024),
               float_test_f1=result.test_metrics['f1'], int8_val_f1=result.int8['val']['f1'],
               **int8_scores(result.int8_onnx, data, settings,
                             os.path.join(args.scratch, f"{arch}-{fold}-{seed}-{os.getpid()}.onnx")))
    return dict(row, wall_s=time.perf_counter() - start)


METRICS = ('test_f1', 'subj_fbeta_median', 'gen')
CAL_METRICS = tuple('cal_' + m for m in METRICS)


def summarize(rows):
    """Per arch: median over folds x seeds and min-max of each metric, per-fold medians."""
    out = []
    for arch in sorted({r['arch'] for r in rows}):
        mine = [r for r in rows if r['arch'] == arch and r['status'] == 'ok']
        if not mine:
            continue
        s = dict(arch=arch, candidate=mine[0]['candidate'], n=len(mine),
                 kb=sorted({round(r['int8_bytes'] / 1024, 2) for r in mine}))
        for m in METRICS + CAL_METRICS:
            v = [r[m] for r in mine if m in r and r[m] == r[m]]
            s[m] = (statistics.median(v), min(v), max(v)) if v else None
        s['per_fold'] = {f: round(statistics.median(r['test_f1'] for r in mine if r['fold'] == f), 3)
                         for f in sorted({r['fold'] for r in mine})}
        s['per_fold_g'] = {f: round(statistics.median(r['gen'] for r in mine if r['fold'] == f), 3)
                           for f in sorted({r['fold'] for r in mine})}
        s['epochs'] = statistics.median(r['epochs'] for r in mine)
        s['wall'] = statistics.median(r['wall_s'] for r in mine)
        out.append(s)
    return out


def print_grid(arch, candidates, size_kb):
    by = {k[0]: k for k in candidates}
    print(f"{arch}: INT8 KB of the grid (stage two's plan; * = over {size_kb} KB)")
    for c in sorted({int(n.split('-')[0][1:]) for n in by}):
        cells = [by[n] for n in sorted(by, key=lambda n: int(n.split('-f')[1]))
                 if n.startswith(f"c{c}-")]
        print('  ' + '  '.join(f"{k[0]} {k[2] / 1024:5.1f}{'' if k[3] else '*'}" for k in cells))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--npz', default=os.path.join(ROOT, '..', 'shared', 'data',
                                                      'ecg_af_train_50k.npz'))
    parser.add_argument('--arms', default='budget,budget+AUGMENT=False,afnet')
    parser.add_argument('--folds', type=int, default=5)
    parser.add_argument('--seeds', type=int, default=3)
    parser.add_argument('--epochs', type=int, default=8)
    parser.add_argument('--lr', type=float, default=0.003)
    parser.add_argument('--size-kb', type=float, default=20)
    parser.add_argument('--pick', default='largest')
    parser.add_argument('--train-frac', type=float, default=1.0)
    parser.add_argument('--only-folds', default='', help='e.g. 0 (default: all folds)')
    parser.add_argument('--teacher', default='AFNet',
                        help="stage one's model that teaches the DISTILL_FROM='fold' arms")
    parser.add_argument('--jobs', type=int, default=2)
    parser.add_argument('--scratch', default='/tmp/atml-ss-arch')
    parser.add_argument('--out', default='')
    parser.add_argument('--summarize', default='', metavar='CSV',
                        help="only print the summary of earlier runs' --out rows "
                             "(several CSVs: comma-separated, e.g. two runs of other arms)")
    args = parser.parse_args()
    if args.summarize:
        import pandas as pd
        print_summary([r for path in args.summarize.split(',')
                       for r in pd.read_csv(path).to_dict('records')])
        return
    from real_data import cpu_name, cpu_vnni
    os.makedirs(os.path.join(args.scratch, 'temp'), exist_ok=True)
    arms = args.arms.split(';' if ';' in args.arms else ',')
    archs = sorted({parse_arm(a)[0] for a in arms}, key=[parse_arm(a)[0] for a in arms].index)
    folds = [int(f) for f in args.only_folds.split(',')] if args.only_folds else range(args.folds)
    print(f"bench_ss_arch: {', '.join(arms)}; {len(folds)} of {args.folds} subject folds x "
          f"{args.seeds} seeds, {args.epochs} epochs, lr {args.lr}, QUANTIZE_INT8, "
          f"SIZE_TARGET_KB={args.size_kb:g}, pick {args.pick}, train-frac {args.train_frac:g}; "
          f"{os.cpu_count()} CPU cores, {cpu_name()} ({cpu_vnni() or 'no VNNI'}), "
          f"{args.jobs} workers", flush=True)
    start = time.perf_counter()
    spawn = multiprocessing.get_context('spawn')     # no fork after autograd ran here
    with futures.ProcessPoolExecutor(args.jobs, mp_context=spawn) as pool:
        plans = dict(zip(archs, pool.map(plan, [args] * len(archs), archs)))
        picked = {}
        for arch in archs:
            print_grid(arch, plans[arch], args.size_kb)
            name, config, size, _ = pick(plans[arch], args.pick)
            print(f"  trained: {name} ({size / 1024:.2f} KB INT8 predicted)", flush=True)
            picked[arch] = (name, config)
        jobs = [(arm, *picked[parse_arm(arm)[0]], f, 42 + s)
                for f in folds for s in range(args.seeds) for arm in arms]
        print(f"planning: {time.perf_counter() - start:.0f} s; {len(jobs)} trials", flush=True)
        if any("DISTILL_FROM='fold'" in parse_arm(a)[1] for a in arms):
            teachers = list(pool.map(run_teacher, [args] * len(folds), folds))
            for t in teachers:
                print(f"  teacher {t['teacher']} fold {t['fold']}: {t['status']}, "
                      f"{t.get('onnx_kb', 0):.2f} KB, held-out F1 {t.get('test_f1', float('nan')):.3f}, "
                      f"subj F-beta median {t.get('subj_fbeta_median', float('nan')):.3f}, "
                      f"G {t.get('gen', float('nan')):.3f}, {t.get('epochs')} epochs, "
                      f"{t['wall_s']:.0f} s", flush=True)
            if args.out:
                import pandas as pd
                pd.DataFrame(teachers).to_csv(args.out + '.teachers.csv', index=False)
            if any(t['status'] not in ('ok', 'reused') for t in teachers):
                raise SystemExit('a teacher failed: ' + repr(teachers))
        rows = []
        pending = {pool.submit(run_one, args, *job): job for job in jobs}
        for done in futures.as_completed(pending):
            r = done.result()
            rows.append(r)
            print(f"  {r['arch']:18} {r['candidate']} fold {r['fold']} seed {r['seed']}: "
                  f"{r['status']}, INT8 {r.get('int8_bytes', 0) / 1024:.2f} KB, held-out F1 "
                  f"{r.get('test_f1', float('nan')):.3f} (float {r.get('float_test_f1', float('nan')):.3f}), "
                  f"subj F-beta median {r.get('subj_fbeta_median', float('nan')):.3f}, "
                  f"G {r.get('gen', float('nan')):.3f}; calibrated F1 "
                  f"{r.get('cal_test_f1', float('nan')):.3f} G {r.get('cal_gen', float('nan')):.3f}, "
                  f"{r['epochs']} epochs, "
                  f"{r['wall_s']:.0f} s", flush=True)
            if args.out:
                import pandas as pd
                pd.DataFrame(rows).to_csv(args.out, index=False)
    print(f"all: {time.perf_counter() - start:.0f} s wall")
    print_summary(rows)


def _span(v):
    return 'n/a' if v is None else f"{v[0]:.3f} [{v[1]:.3f}-{v[2]:.3f}]"


def print_summary(rows):
    print("\narm                 candidate  n  INT8 KB   held-out F1 median [min-max]  subj F-beta "
          "median  G median  | calibrated threshold: F1  subj F-beta  G | per-fold F1 (G)  "
          "epochs  s/trial")
    for s in summarize(rows):
        print(f"{s['arch']:19} {s['candidate']:9} {s['n']:2}  {s['kb']}  "
              + '  '.join(_span(s[m]) for m in METRICS) + '  |  '
              + '  '.join(_span(s[m]) for m in CAL_METRICS)
              + f"  | {s['per_fold']} ({s['per_fold_g']})  {s['epochs']}  {s['wall']:.0f}")
    print_paired(rows)


def paired(rows, ref, arm, metric):
    """Differences arm - ref of metric over the (fold, seed) pairs both have (ok rows)."""
    by = {(r['arch'], r['fold'], r['seed']): r[metric] for r in rows
          if r['status'] == 'ok' and metric in r and r[metric] == r[metric]}
    return [by[arm, f, s] - by[ref, f, s] for (a, f, s) in sorted(by)
            if a == arm and (ref, f, s) in by]


def _ahead(d):
    return f"{sum(x > 1e-9 for x in d)}/{sum(x < -1e-9 for x in d)}/{len(d)}"


def print_paired(rows):
    """Each arm against 'afnet' and 'budget' (those present; else the first arm) over their
    (fold, seed) pairs: the median difference, its range, and in how many pairs the arm is
    ahead / behind; and the calibrated threshold against the arm's own argmax."""
    arms = list(dict.fromkeys(r['arch'] for r in rows if r['status'] == 'ok'))
    if not arms:
        return
    refs = [a for a in ('afnet', 'budget') if a in arms] or arms[:1]
    print("\npaired differences over the (fold, seed) pairs: median [min-max], "
          "ahead/behind/pairs")
    for arm in arms:
        cells = []
        for m in METRICS:
            for ref in refs:
                d = paired(rows, ref, arm, m) if arm != ref else []
                if d:
                    cells.append(f"{m} vs {ref}: {statistics.median(d):+.3f} [{min(d):+.3f}-"
                                 f"{max(d):+.3f}] {_ahead(d)}")
            cal = [r['cal_' + m] - r[m] for r in rows if r['arch'] == arm
                   and r['status'] == 'ok' and r.get('cal_' + m) == r.get('cal_' + m)]
            if cal:
                cells.append(f"{m}: calibrated threshold vs argmax {statistics.median(cal):+.3f} "
                             f"{_ahead(cal)}")
        print(f"  {arm}:\n    " + '\n    '.join(cells))


if __name__ == '__main__':
    main()
