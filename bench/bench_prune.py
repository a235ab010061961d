"""Pruned vs width-scaled stage-two AFNets at (nearly) equal ONNX size, on real ECG data.

    python bench/bench_prune.py          # 4 seeds, every training segment: ~15 min, 2 cores
    python bench/bench_prune.py --seeds 2 --epochs 12 --train-segments 8000   # ~5 min

Data: /work/shared/data/ecg_af_segments.npz (x float16 (N, 1250), rhythm, subject; AF =
rhythm 'AFIB'). Subjects S51 S52 S53 S55 S56 S57 S58 S59 S60 S61 S63 S65 S66 are held out
for the test; of the other 40, 20 % (split_by_subject, seed 42) validate (early stopping,
best weights, validation metrics). Training segments may be subsampled (--train-segments,
seeded) to keep the run short on a shared machine; the log says how many were used.

Width-scaled candidates (c1-f1, c2-f1, c2-f2, c3-f2) and the parents (c4-f2, c3-f3) train
from scratch with the stage-one trial (public.search.trial.run_trial, AUGMENT=True, lr 0.0015, up
to --epochs epochs). Each parent's best weights are then pruned (public.compress.channel_prune.prune_model:
c4-f2 by 0.25 / 0.5 / 0.75, c3-f3 by 0.5) and fine-tuned --finetune-epochs epochs through
the same run_trial. Every model prints ONNX bytes (of the exported, onnxruntime-checked
file), parameters, validation and held-out test min-metric (min of F1, accuracy,
precision, recall) and F1, and wall seconds; each pruned model's size predicted before
training (pruned_size) is compared with its trained file. Each pruned model is paired with
the width-scaled model nearest in size. Last, unstructured pruning (zeroed weights) of a
trained parent is exported to show that it does not shrink the file.
"""
import argparse
import concurrent.futures as futures
import datetime
import gzip
import multiprocessing
import os
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from real_data import TEST_SUBJECTS, subject_split  # noqa: E402,F401
WIDTH_SCALED = ((1, 1), (2, 1), (2, 2), (3, 2))
PARENTS = {(4, 2): (0.25, 0.5, 0.75), (3, 3): (0.5,)}
SPLIT_SEED = 42
_DATA = {}


def _name(c, f, fraction=None):
    return f"c{c}-f{f}" + (f"@{fraction:g}" if fraction else '')


def _prepared(args):
    """The split data of this process (loaded once per worker)."""
    if 'data' not in _DATA:
        data, split = subject_split(args.npz, SPLIT_SEED, args.train_segments, onnx_sample=32)
        summary = {k: (len(i), len(np.unique(split.subjects[i])), float(split.y[i].mean()))
                   for k, i in (('train', split.train), ('val', split.val),
                                ('test', split.test))}
        summary['val_subjects'] = sorted(np.unique(split.subjects[split.val]).tolist())
        _DATA.update(data=(data, summary))
    return _DATA['data']


def _settings(args, seed, epochs):
    from public.core.settings import load_settings
    values = dict(NUM_EPOCHS=epochs, SEED=seed, DEVICE='cpu', NUM_THREADS=1, WORKERS=1,
                  LATENCY_RUNS=1, BATCH_SIZE=32, TEMP_DIR=os.path.join(args.scratch, 'temp'),
                  TEST_DIR='', AUGMENT=True, NORMALIZE='none', CLASS_WEIGHTS='none')
    return load_settings([f"{k}={v!r}" for k, v in values.items()],
                         params_path=os.path.join(ROOT, 'params.py'))


def _build(c, f):
    import functools
    import public.ss_model as ss
    return functools.partial(ss.AFNet, ss.generate_config(c, f, 1250))


def _metrics(model, data):
    import torch
    from public.test import classification_metrics, predict_proba, worst_metric
    out = {}
    for split, x, y in (('val', data.trial.x_val, data.trial.y_val.numpy()),
                        ('test', data.x_test, data.y_test)):
        m = classification_metrics(y, predict_proba(model, x, torch.device('cpu')), 2)
        out[f"{split}_min4"], out[f"{split}_f1"] = worst_metric(m), m['f1']
    return out


def _row_from(result, **fields):
    from public.test import worst_metric
    row = dict(fields, status=result.status, onnx_bytes=result.onnx_bytes, params=result.params,
               epochs=result.epochs, best_epoch=result.best_epoch, wall_s=result.wall_s)
    if result.status != 'ok':
        row['error'] = (result.error or '').strip().splitlines()[-1][:300] if result.error else ''
        return row
    row.update(val_min4=worst_metric(result.val_metrics), val_f1=result.val_metrics['f1'],
               test_min4=worst_metric(result.test_metrics), test_f1=result.test_metrics['f1'])
    return row


def train_scratch(args, c, f, seed):
    """A width-scaled model (or a parent) trained from scratch; its row and best weights."""
    import torch
    torch.set_num_threads(1)
    from public.search.trial import run_trial
    data, _ = _prepared(args)
    settings = _settings(args, seed, args.epochs)
    onnx = os.path.join(args.scratch, f"{_name(c, f)}-{seed}-{os.getpid()}.onnx")
    result = run_trial(_build(c, f), args.lr, data, settings, onnx, progress=False, latency=False)
    row = _row_from(result, model=_name(c, f), kind='parent' if (c, f) in PARENTS else 'width',
                    c=c, f=f, fraction=0.0, seed=seed)
    return row, result.state_dict


def finetune_pruned(args, c, f, fraction, seed, state_dict):
    """The parent's best weights pruned by `fraction`, scored as pruned, then fine-tuned."""
    import torch
    torch.set_num_threads(1)
    from public.compress.channel_prune import copy_builder, prune_model
    from public.search.trial import run_trial
    data, _ = _prepared(args)
    parent = _build(c, f)()
    parent.load_state_dict(state_dict)
    start = time.perf_counter()
    pruned = prune_model(parent, fraction, data.trial.x_train[:2].unsqueeze(-1))
    prune_s = time.perf_counter() - start
    before = _metrics(pruned, data)
    settings = _settings(args, seed, args.finetune_epochs)
    onnx = os.path.join(args.scratch, f"{_name(c, f, fraction)}-{seed}-{os.getpid()}.onnx")
    result = run_trial(copy_builder(pruned), args.lr, data, settings, onnx, progress=False,
                       latency=False)
    row = _row_from(result, model=_name(c, f, fraction), kind='pruned', c=c, f=f,
                    fraction=fraction, seed=seed, prune_s=prune_s,
                    **{f"unfinetuned_{k}": v for k, v in before.items()})
    return row, None


def unstructured_demo(args, c, f, state_dict):
    """Sizes of a trained parent: dense, with zeroed weights, structurally pruned; gzip too."""
    import torch
    torch.set_num_threads(1)
    from public.compress.export import export_onnx
    from public.compress.channel_prune import prune_model, unstructured_prune
    model = _build(c, f)()
    model.load_state_dict(state_dict)
    model.eval()
    lines = []
    with tempfile.TemporaryDirectory() as folder:
        def sizes(m, tag):
            path = os.path.join(folder, f"{tag}.onnx")
            raw = export_onnx(m, path, 1, 1250, 18)
            with open(path, 'rb') as fh:
                packed = len(gzip.compress(fh.read(), 9))
            weights = [mod.weight for mod in m.modules() if isinstance(mod, (torch.nn.Conv1d, torch.nn.Linear))]
            zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
            lines.append(f"  {tag:34} {raw:>8} bytes   gzip -9 {packed:>8} bytes   "
                         f"params {sum(p.numel() for p in m.parameters()):>6}   "
                         f"zero conv/linear weights {zeros:.0%}")
        sizes(model, f"{_name(c, f)} trained, dense")
        for fraction in (0.5, 0.75):
            sizes(unstructured_prune(model, fraction), f"unstructured {fraction:g} (zeroed)")
            sizes(prune_model(model, fraction, torch.zeros(2, 1, 1250, 1)),
                  f"structured {fraction:g} (prune_model)")
    return lines


def _fmt(v, spec='.3f'):
    return format(v, spec) if isinstance(v, (int, float)) else '-'


def _summary(rows):
    """Per model: mean (and per-seed values) over seeds of the metrics."""
    out = {}
    for r in rows:
        if r['status'] != 'ok':
            continue
        out.setdefault(r['model'], []).append(r)
    table = {}
    for model, mine in out.items():
        mean = {k: statistics.mean(r[k] for r in mine)
                for k in ('val_min4', 'val_f1', 'test_min4', 'test_f1', 'wall_s', 'epochs')}
        table[model] = dict(mine[0], **mean, seeds=len(mine),
                            spread={k: (min(r[k] for r in mine), max(r[k] for r in mine))
                                    for k in ('test_min4', 'test_f1')})
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--npz', default=os.path.join(ROOT, '..', 'shared', 'data', 'ecg_af_segments.npz'))
    parser.add_argument('--seeds', type=int, default=4)
    parser.add_argument('--epochs', type=int, default=15)
    parser.add_argument('--finetune-epochs', type=int, default=3)
    parser.add_argument('--train-segments', type=int, default=0, help='0 = all')
    parser.add_argument('--lr', type=float, default=0.0015)
    parser.add_argument('--jobs', type=int, default=2)
    parser.add_argument('--scratch', default='/tmp/atml-bench-prune')
    args = parser.parse_args()
    os.makedirs(os.path.join(args.scratch, 'temp'), exist_ok=True)
    import torch
    torch.set_num_threads(1)
    from public.compress.channel_prune import pruned_size
    start = time.perf_counter()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    print(f"bench_prune {datetime.datetime.now():%Y-%m-%d %H:%M}: {os.cpu_count()} CPU cores "
          f"({affinity} usable), load average {' '.join(f'{v:.2f}' for v in os.getloadavg())} "
          f"(shared with other jobs); torch {torch.__version__}, 1 thread per worker, "
          f"{args.jobs} workers", flush=True)
    _, summary = _prepared(args)
    print(f"data {os.path.abspath(args.npz)}: train {summary['train'][0]} segments "
          f"({summary['train'][1]} subjects, AF {summary['train'][2]:.0%}"
          f"{', subsampled with seed 42 from all training segments' if args.train_segments else ''}), "
          f"validation {summary['val'][0]} ({summary['val'][1]} subjects {summary['val_subjects']}, "
          f"AF {summary['val'][2]:.0%}), held-out test {summary['test'][0]} "
          f"({summary['test'][1]} subjects, AF {summary['test'][2]:.0%})")
    print(f"recipe: run_trial, AUGMENT=True, lr {args.lr}, batch 32, AdamW, up to {args.epochs} "
          f"epochs from scratch (early stopping patience 5), pruned models fine-tuned "
          f"{args.finetune_epochs} epochs at the same lr (best-validation epoch kept); "
          f"seeds {[42 + s for s in range(args.seeds)]}; ONNX opset 18", flush=True)

    predicted = {}
    for (c, f), fractions in PARENTS.items():
        for fraction in fractions:
            predicted[_name(c, f, fraction)] = pruned_size(_build(c, f), fraction, 1, 1250, 18)
    print("predicted ONNX bytes of the pruned models (before any training): "
          + ', '.join(f"{k} {v}" for k, v in predicted.items()), flush=True)

    seeds = [42 + s for s in range(args.seeds)]
    rows, parents_state = [], {}
    spawn = multiprocessing.get_context('spawn')
    with futures.ProcessPoolExecutor(args.jobs, mp_context=spawn) as pool:
        pending = {}
        order = list(PARENTS) + list(WIDTH_SCALED)      # parents first: fine-tunes start early
        for seed in seeds:
            for c, f in order:
                pending[pool.submit(train_scratch, args, c, f, seed)] = (c, f, seed)
        while pending:
            done, _ = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
            for fut in done:
                c, f, seed = pending.pop(fut)[:3]
                row, state = fut.result()
                rows.append(row)
                print(f"  {row['model']:10} seed {row['seed']}: {row['status']}, "
                      f"val min4 {_fmt(row.get('val_min4'))} F1 {_fmt(row.get('val_f1'))}, "
                      f"test min4 {_fmt(row.get('test_min4'))} F1 {_fmt(row.get('test_f1'))}, "
                      f"{row['onnx_bytes']} bytes, {row['epochs']} epochs, {row['wall_s']:.0f} s"
                      + (f" [{row['error']}]" if row.get('error') else ''), flush=True)
                if row['kind'] == 'parent' and row['status'] == 'ok':
                    parents_state[(c, f, seed)] = state
                    for fraction in PARENTS[(c, f)]:
                        job = pool.submit(finetune_pruned, args, c, f, fraction, seed, state)
                        pending[job] = (c, f, seed, fraction)
    print(f"all trials: {time.perf_counter() - start:.0f} s wall")

    table = _summary(rows)
    parent_wall = {m: r['wall_s'] for m, r in table.items() if r['kind'] == 'parent'}
    print(f"\nPer model, mean over {args.seeds} seed(s) [test min4 range over seeds]; "
          f"wall = this model's own training (pruned: fine-tuning only; +parent = with the "
          f"parent's training)")
    print(f"{'model':12} {'kind':6} {'ONNX B':>7} {'params':>6} {'val min4':>8} {'val F1':>6} "
          f"{'test min4':>9} {'test F1':>7} {'test min4 range':>15} {'epochs':>6} {'wall s':>6} "
          f"{'+parent':>7}  before fine-tune (val/test min4)")
    for model, r in sorted(table.items(), key=lambda kv: kv[1]['onnx_bytes']):
        lo, hi = r['spread']['test_min4']
        extra = (f"{r['wall_s'] + parent_wall.get(_name(r['c'], r['f']), float('nan')):7.0f}  "
                 f"{statistics.mean(x['unfinetuned_val_min4'] for x in rows if x['model'] == model and 'unfinetuned_val_min4' in x):.3f} / "
                 f"{statistics.mean(x['unfinetuned_test_min4'] for x in rows if x['model'] == model and 'unfinetuned_test_min4' in x):.3f}"
                 if r['kind'] == 'pruned' else f"{'':7}")
        print(f"{model:12} {r['kind']:6} {r['onnx_bytes']:>7} {r['params']:>6} {r['val_min4']:8.3f} "
              f"{r['val_f1']:6.3f} {r['test_min4']:9.3f} {r['test_f1']:7.3f} "
              f"{f'{lo:.3f}-{hi:.3f}':>15} {r['epochs']:6.1f} {r['wall_s']:6.0f} {extra}")

    print("\nPredicted (untrained probe) vs trained pruned ONNX bytes:")
    for model, size in predicted.items():
        actual = sorted({x['onnx_bytes'] for x in rows if x['model'] == model and x['status'] == 'ok'})
        print(f"  {model:10} predicted {size}, trained {actual}: "
              f"{'exact' if actual == [size] else 'MISMATCH'}")

    print("\nPruned vs the width-scaled model nearest in ONNX size (mean over seeds; "
          "delta = pruned - width-scaled):")
    widths = {m: r for m, r in table.items() if r['kind'] == 'width'}
    for model, r in sorted(table.items(), key=lambda kv: kv[1]['onnx_bytes']):
        if r['kind'] != 'pruned' or not widths:
            continue
        near_name, near = min(widths.items(), key=lambda kv: abs(kv[1]['onnx_bytes'] - r['onnx_bytes']))
        print(f"  {model:10} {r['onnx_bytes']:>6} B vs {near_name:6} {near['onnx_bytes']:>6} B "
              f"({r['onnx_bytes'] - near['onnx_bytes']:+6d} B): "
              f"val min4 {r['val_min4']:.3f} vs {near['val_min4']:.3f} ({r['val_min4'] - near['val_min4']:+.3f}), "
              f"test min4 {r['test_min4']:.3f} vs {near['test_min4']:.3f} ({r['test_min4'] - near['test_min4']:+.3f}), "
              f"test F1 {r['test_f1']:.3f} vs {near['test_f1']:.3f} ({r['test_f1'] - near['test_f1']:+.3f})")

    print("\nUnstructured pruning does not shrink the ONNX file (trained parent, seed "
          f"{seeds[0]}):")
    key = next((k for k in parents_state if k[:2] == (4, 2)), None)
    if key:
        for line in unstructured_demo(args, key[0], key[1], parents_state[key]):
            print(line)
    print(f"\ntotal: {time.perf_counter() - start:.0f} s wall")


if __name__ == '__main__':
    main()
