"""Post-training INT8 (PTQ) against quantization-aware training (QAT), on the real ECG data.

    python bench/bench_qat.py                                   # c1-f1, c2-f1, c2-f5, c3-f3
    python bench/bench_qat.py --candidates c2-f5 --seeds 42,7 --qat-epochs 3

Data: the shared .npz (AF = rhythm 'AFIB'). Subjects S51 S52 S53 S55 S56 S57 S58 S59 S60
S61 S63 S65 S66 are the held-out test set; of the other 40, 20 % (seeded, as ATML splits)
validate. For each stage-two candidate cN-fM (ss_model.AFNet(generate_config(N, M, 1250)))
and seed: train float with public.search.trial.run_trial (LR 0.0015, AUGMENT, up to --epochs with
the normal early stopping, --batch (32), 1 thread), then measure on validation and test
  float  the PyTorch model,
  PTQ    public.compress.quantize.quantize_int8 calibrated on public.data.prepare.calibration_sample's 256
         training segments, run in onnxruntime,
  PTQ-p  the same onnxruntime quantization with activation ranges at the 99.99th percentile
         of the same segments (public.compress.qat with ranges=(99.99,), no training),
  QAT    public.compress.qat (--qat-epochs, --qat-lr, same calibration), run in onnxruntime,
with the min-metric (min of F1 / accuracy / precision / recall), F1, ROC AUC and the share
of segments where the INT8 model's class equals the float model's (overall, and for the
test subject where it is lowest). For PTQ it also prints
where the INT8 error comes from (public.compress.qat.quantization_sensitivity on validation: the KL
divergence from the float model's outputs with the weights, all activations, or one
activation tensor at a time left in float).
"""
import argparse
import datetime
import functools
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from real_data import TEST_SUBJECTS, cpu_vnni, make_log, subject_split  # noqa: E402,F401


def load(path, seed, subsample):
    """PreparedData of the split (train / validation subjects by seed, fixed test subjects)."""
    data, split = subject_split(path, seed, subsample)
    return data, split.describe()


def settings_for(args, seed):
    from public.core.settings import load_settings
    values = dict(NUM_EPOCHS=args.epochs, SEED=seed, DEVICE='cpu', NUM_THREADS=1, WORKERS=1,
                  LATENCY_RUNS=1, BATCH_SIZE=args.batch, AUGMENT=not args.no_augment, NORMALIZE='none',
                  CLASS_WEIGHTS='none', TEST_DIR='', ONNX_OPSET=18,
                  INT8_REDUCE_RANGE=not args.full_range,
                  TEMP_DIR=os.path.join(args.scratch, 'temp'))
    return load_settings([f"{k}={v!r}" for k, v in values.items()],
                         params_path=os.path.join(ROOT, 'params.py'))


def scores(logits, y, reference=None):
    from public.test import classification_metrics, worst_metric
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    m = classification_metrics(y, probs, 2)
    out = dict(min4=worst_metric(m), f1=m['f1'], auc=m['auc'], recall=m['recall'],
               precision=m['precision'])
    if reference is not None:
        out['agree'] = float((logits.argmax(1) == reference.argmax(1)).mean())
    return out


def worst_subject(logits, reference, subjects):
    """(subject, share of its segments where INT8's class equals the float model's), the
    subject with the lowest share."""
    same = logits.argmax(1) == reference.argmax(1)
    shares = {s: float(same[subjects == s].mean()) for s in np.unique(subjects)}
    subject = min(shares, key=shares.get)
    return str(subject), shares[subject]


def kl_to(reference_logits):
    import torch
    reference = torch.softmax(torch.as_tensor(reference_logits), dim=1)

    def loss(logits):
        log_p = torch.log_softmax(logits, dim=1)
        return float((reference * (reference.clamp_min(1e-12).log() - log_p)).sum(1).mean())
    return loss


def run_candidate(args, name, seed, data, log):
    import torch
    import public.ss_model as ss
    import public.compress.qat as qat
    from public.compress.export import onnx_predict
    from public.compress.quantize import quantize_int8
    from public.data.prepare import calibration_sample
    from public.search.trial import run_trial
    channels, fc = (int(part[1:]) for part in name.split('-'))
    build = functools.partial(ss.AFNet, ss.generate_config(channels, fc, 1250))
    settings = settings_for(args, seed)
    folder = os.path.join(args.scratch, f"{name}-{seed}")
    os.makedirs(folder, exist_ok=True)
    float_path = os.path.join(folder, 'float.onnx')
    start = time.perf_counter()
    result = run_trial(build, args.lr, data, settings, float_path, progress=False, latency=False)
    train_s = time.perf_counter() - start
    if result.status != 'ok':
        log(f"{name} seed {seed}: float training {result.status}: {result.error[-800:]}")
        return None
    model = build()
    model.load_state_dict(result.state_dict)
    model.eval()
    x_val, y_val = data.trial.x_val.numpy(), data.trial.y_val.numpy()
    x_test, y_test = data.x_test.numpy(), data.y_test
    with torch.no_grad():
        float_val = model(data.trial.x_val.unsqueeze(-1)).numpy()
        float_test = model(data.x_test.unsqueeze(-1)).numpy()
    calibration = calibration_sample(data)
    row = dict(candidate=name, seed=seed, epochs=result.epochs, best_epoch=result.best_epoch,
               train_s=train_s, float_bytes=result.onnx_bytes,
               float_val=scores(float_val, y_val), float_test=scores(float_test, y_test))

    ptq_path = os.path.join(folder, 'ptq.int8.onnx')
    start = time.perf_counter()
    row['ptq_bytes'] = quantize_int8(float_path, ptq_path, calibration,
                                     reduce_range=settings.INT8_REDUCE_RANGE)
    row['ptq_s'] = time.perf_counter() - start
    row['ptq_val'] = scores(onnx_predict(ptq_path, x_val), y_val, float_val)
    row['ptq_test'] = scores(onnx_predict(ptq_path, x_test), y_test, float_test)

    # QAT's starting point: the same onnxruntime quantization with percentile ranges
    start = time.perf_counter()
    percentile = qat.qat_finetune(model, data.trial, args.qat_lr, settings, 0, calibration, 1,
                                  1250, settings.ONNX_OPSET, ranges=(99.99,))
    ptqp_path = os.path.join(folder, 'ptq-percentile.int8.onnx')
    row['ptqp_bytes'] = qat.write_int8(percentile.int8, ptqp_path)
    row['ptqp_s'] = time.perf_counter() - start
    row['ptqp_val'] = scores(onnx_predict(ptqp_path, x_val), y_val, float_val)
    row['ptqp_test'] = scores(onnx_predict(ptqp_path, x_test), y_test, float_test)

    qat_path = os.path.join(folder, 'qat.int8.onnx')
    start = time.perf_counter()
    outcome = qat.qat_finetune(model, data.trial, args.qat_lr, settings, args.qat_epochs,
                               calibration, 1, 1250, settings.ONNX_OPSET)
    row['qat_bytes'] = qat.write_int8(outcome.int8, qat_path)
    row['qat_s'] = time.perf_counter() - start
    row['qat_best_epoch'] = outcome.best_epoch
    row['qat_val'] = scores(onnx_predict(qat_path, x_val), y_val, float_val)
    row['qat_test'] = scores(onnx_predict(qat_path, x_test), y_test, float_test)
    kl = kl_to(float_val)
    for kind, path in (('ptq', ptq_path), ('ptqp', ptqp_path), ('qat', qat_path)):
        row[f"{kind}_val"]['kl'] = kl(torch.from_numpy(onnx_predict(path, x_val)))
    history = ', '.join(f"{e}: {v:.4f}" for e, _, v in outcome.history)
    log(f"{name} seed {seed}: float {result.epochs} epochs (best {result.best_epoch}) "
        f"{train_s:.0f} s; PTQ {row['ptq_s']:.1f} s; PTQ-p99.99 {row['ptqp_s']:.1f} s; QAT "
        f"{args.qat_epochs} epochs {row['qat_s']:.0f} s, validation KL(float || INT8) by epoch "
        f"[{history}], kept epoch {outcome.best_epoch}; ranges "
        f"{'min/max' if outcome.percentile is None else f'p{outcome.percentile}'} (epoch-0 KL "
        f"min/max {outcome.start_losses[None]:.4f}, p99.99 {outcome.start_losses[99.99]:.4f})")
    for split in ('val', 'test'):
        for kind, label in (('float', 'float'), ('ptq', 'PTQ'), ('ptqp', 'PTQ-p'), ('qat', 'QAT')):
            s = row[f"{kind}_{split}"]
            log(f"    {split:4} {label:5} min4 {s['min4']:.3f}  F1 {s['f1']:.3f}  "
                f"AUC {s['auc']:.3f}"
                f"  recall {s['recall']:.3f}  precision {s['precision']:.3f}"
                + (f"  same class as float {s['agree']:.1%}" if 'agree' in s else '')
                + (f"  KL from float {s['kl']:.4f}" if 'kl' in s else ''))
    worst = []
    for kind, label, path in (('ptq', 'PTQ', ptq_path), ('ptqp', 'PTQ-p', ptqp_path),
                              ('qat', 'QAT', qat_path)):
        subject, agree = worst_subject(onnx_predict(path, x_test), float_test, data.test_subjects)
        row[f"{kind}_test"]['worst'] = (subject, agree)
        worst.append(f"{label} {subject} {agree:.1%}")
    log(f"    test subject whose INT8 classes agree least with float: {', '.join(worst)}")
    if args.sensitivity:
        sensitivity(args, model, data, calibration, float_val, log, settings.INT8_REDUCE_RANGE)
    return row


def sensitivity(args, model, data, calibration, float_val, log, reduce_range):
    """Where PTQ's error comes from, on (up to --sensitivity) validation segments."""
    import tempfile
    import public.compress.qat as qat
    import public.compress.qdq_graph as qdq_graph
    n = min(args.sensitivity, len(data.trial.x_val))
    x = data.trial.x_val[:n].unsqueeze(-1)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = qdq_graph.prepare_float_graph(model, 1, 1250, 18, tmp)
    qdq = qdq_graph.quantize_qdq(prepared, calibration, None, reduce_range)
    graph = qdq_graph.FakeQuantGraph(prepared, qdq, reduce_range)
    rows = qat.quantization_sensitivity(graph, x, kl_to(float_val[:n]))
    base = rows[0][1]
    log(f"    PTQ error by source (validation KL from float on {n} segments; lower = that "
        f"part, left float, explains more): all INT8 {base:.4f}; weights float "
        f"{rows[1][1]:.4f}; activations float {rows[2][1]:.4f}")
    for tensor, loss in rows[3:3 + args.top]:
        log(f"      activation {tensor} float: {loss:.4f} ({(base - loss) / base:+.0%} of "
            f"the error removed)")


KINDS = ('float', 'ptq', 'ptqp', 'qat')


def table(rows, log):
    log('')
    log('PTQ = public.compress.quantize (min/max ranges); PTQ-p = onnxruntime ranges at the 99.99th '
        'percentile, no training; QAT = public.compress.qat. min4 and F1 columns: '
        'float PTQ PTQ-p QAT. KL: validation KL divergence of the INT8 outputs from the float '
        "model's (PTQ PTQ-p QAT). 'PTQ lost': float - PTQ min4 > 5 points; 'QAT ok': "
        'float - QAT min4 <= 1 point.')
    log('candidate seed | bytes float / PTQ / QAT    | val min4 (4)            | val F1 (4)'
        '              | test min4 (4)           | test F1 (4)             | val KL PTQ PTQ-p QAT'
        '  | PTQ lost val/test | QAT ok val/test')
    for r in rows:
        def four(split, key):
            return ' '.join(f"{r[f'{k}_{split}'][key]:.3f}" for k in KINDS)

        def flag(split, kind, limit):
            gap = r[f'float_{split}']['min4'] - r[f'{kind}_{split}']['min4']
            return 'yes' if (gap > limit if kind == 'ptq' else gap <= limit) else 'no'
        kls = ' '.join(f"{r[f'{k}_val']['kl']:.4f}" for k in ('ptq', 'ptqp', 'qat'))
        log(f"{r['candidate']:9} {r['seed']:4} | {r['float_bytes']:6,} / {r['ptq_bytes']:6,} / "
            f"{r['qat_bytes']:6,} | {four('val', 'min4')} | {four('val', 'f1')} | "
            f"{four('test', 'min4')} | {four('test', 'f1')} | {kls} | "
            f"{flag('val', 'ptq', 0.05):>3} / {flag('test', 'ptq', 0.05):3}         | "
            f"{flag('val', 'qat', 0.01):>3} / {flag('test', 'qat', 0.01):3}")
    if rows:
        log('mean over rows:')
        for kind, label in (('ptq', 'PTQ'), ('ptqp', 'PTQ-p'), ('qat', 'QAT')):
            agree_val = np.mean([r[f'{kind}_val']['agree'] for r in rows])
            agree_test = np.mean([r[f'{kind}_test']['agree'] for r in rows])
            gap_val = np.mean([abs(r['float_val']['min4'] - r[f'{kind}_val']['min4'])
                               for r in rows])
            gap_test = np.mean([abs(r['float_test']['min4'] - r[f'{kind}_test']['min4'])
                                for r in rows])
            kl = np.mean([r[f'{kind}_val']['kl'] for r in rows])
            worst = min(r[f'{kind}_test']['worst'][1] for r in rows)
            log(f"  {label:5} same class as float: validation {agree_val:.1%}, test "
                f"{agree_test:.1%} (worst test subject {worst:.1%}); |min4 - float min4|: "
                f"validation {gap_val:.3f}, test {gap_test:.3f}; validation KL from float "
                f"{kl:.4f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--npz', default=os.path.join(ROOT, '..', 'shared', 'data',
                                                      'ecg_af_segments.npz'))
    parser.add_argument('--candidates', default='c1-f1,c2-f1,c2-f5,c3-f3')
    parser.add_argument('--seeds', default='42', help='comma-separated training seeds')
    parser.add_argument('--epochs', type=int, default=12, help='float training epochs (max)')
    parser.add_argument('--lr', type=float, default=0.0015, help='float training rate')
    parser.add_argument('--batch', type=int, default=32, help='float training batch size')
    parser.add_argument('--no-augment', action='store_true',
                        help="float training with AUGMENT=False (the original recipe)")
    parser.add_argument('--full-range', action='store_true',
                        help='INT8_REDUCE_RANGE=False: 8-bit weights (saturate on x86 without VNNI)')
    parser.add_argument('--qat-epochs', type=int, default=3)
    parser.add_argument('--qat-lr', type=float, default=0.0001, help='QAT fine-tuning rate')
    parser.add_argument('--subsample', type=int, default=0,
                        help='training segments used (0 = all)')
    parser.add_argument('--sensitivity', type=int, default=1000,
                        help='validation segments for the PTQ error analysis (0 = skip)')
    parser.add_argument('--top', type=int, default=4, help='activation tensors listed')
    parser.add_argument('--scratch', default='/tmp/atml-bench-qat')
    parser.add_argument('--out', default='', help='also write the log to this file')
    args = parser.parse_args()
    import torch
    torch.set_num_threads(1)
    log = make_log(args.out)
    import onnxruntime
    load_avg = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
    log(f"bench_qat {datetime.date.today()}: {os.cpu_count()} CPU cores (load average "
        f"{load_avg:.1f} at start), torch {torch.__version__} ({torch.get_num_threads()} "
        f"thread), onnxruntime {onnxruntime.__version__}")
    vnni = cpu_vnni()
    log(f"INT8 weights: {'8-bit (full range)' if args.full_range else '7-bit (reduce_range)'}; "
        f"this CPU {'has ' + vnni if vnni else 'has no VNNI (its u8s8 kernels saturate 8-bit weights)'}")
    log(f"float: LR {args.lr}, {'no augmentation' if args.no_augment else 'AUGMENT'}, batch {args.batch}, up to {args.epochs} epochs (early stopping "
        f"PATIENCE/OVERFIT_GAP of params.py); QAT: {args.qat_epochs} epochs, LR {args.qat_lr} "
        f"(cosine to 0), distillation from the float model, starting from the better (on "
        f"validation) of min/max and 99.99th-percentile ranges of 256 calibration segments")
    rows, start = [], time.perf_counter()
    for seed in (int(s) for s in args.seeds.split(',')):
        data, split = load(args.npz, seed, args.subsample)
        log(f"seed {seed}: {split}" + (f" (training subsampled to {args.subsample})"
                                      if args.subsample else ''))
        for name in args.candidates.split(','):
            row = run_candidate(args, name, seed, data, log)
            if row:
                rows.append(row)
    table(rows, log)
    log(f"total {time.perf_counter() - start:.0f} s")


if __name__ == '__main__':
    main()
