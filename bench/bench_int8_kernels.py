"""Does this CPU run an INT8 file as written? onnxruntime's fused integer kernels against
the same QDQ file run node by node (graph optimisations off: exact arithmetic), with 8-bit
and with 7-bit (INT8_REDUCE_RANGE) weights, on the real data.

    python bench/bench_int8_kernels.py                          # c2-f1, c2-f4, c2-f5, seed 42

For each stage-two candidate: train float (public.search.trial.run_trial; lr 0.0015, no
augmentation, batch 64, up to 12 epochs with early stopping, 1 thread; the split of
bench/real_data.py), quantize it with public.compress.quantize.quantize_int8 with full-range and
with reduced-range weights, and print validation and test min4 (min of F1 / accuracy /
precision / recall) of float, of the INT8 file in onnxruntime's kernels ("kernels") and
run exactly ("exact"), the largest |kernels - exact| logit difference and the share of
segments where they give the same class. On x86 CPUs without VNNI the u8s8 kernels add
uint8 x int8 pairs in 16 bits and saturate with 8-bit weights; with 7-bit weights they
cannot (README, "INT8 on CPUs without VNNI").
"""
import argparse
import datetime
import functools
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from real_data import cpu_name, cpu_vnni, make_log, subject_split  # noqa: E402


def logits(path, x, exact):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if exact:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    name = session.get_inputs()[0].name
    x = np.asarray(x, dtype=np.float32)[..., None]
    return np.concatenate([session.run(None, {name: x[i:i + 1024]})[0]
                           for i in range(0, len(x), 1024)])


def min4(out, y):
    from public.test import classification_metrics, worst_metric
    p = np.exp(out - out.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return worst_metric(classification_metrics(y, p, 2))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--candidates', default='c2-f1,c2-f4,c2-f5')
    parser.add_argument('--seed', type=int, default=42)
    parser.add_argument('--epochs', type=int, default=12)
    parser.add_argument('--out', default='', help='also write the log to this file')
    args = parser.parse_args()
    import torch
    import onnxruntime
    import public.ss_model as ss
    from public.core.settings import load_settings
    from public.compress.quantize import quantize_int8
    from public.data.prepare import calibration_sample
    from public.search.trial import run_trial
    torch.set_num_threads(1)
    log = make_log(args.out)
    log(f"bench_int8_kernels {datetime.date.today()}: {os.cpu_count()} CPU cores, "
        f"{cpu_name()}, {cpu_vnni() or 'no VNNI'}; torch "
        f"{torch.__version__}, onnxruntime {onnxruntime.__version__}")
    data, split = subject_split(seed=args.seed)
    log(f"seed {args.seed}: {split.describe()}")
    values = dict(NUM_EPOCHS=args.epochs, SEED=args.seed, DEVICE='cpu', NUM_THREADS=1,
                  WORKERS=1, LATENCY_RUNS=1, BATCH_SIZE=64, AUGMENT=False, NORMALIZE='none',
                  CLASS_WEIGHTS='none', TEST_DIR='', ONNX_OPSET=18)
    calibration = calibration_sample(data)
    splits = (('val', data.trial.x_val.numpy(), data.trial.y_val.numpy()),
              ('test', data.x_test.numpy(), data.y_test))
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings([f"{k}={v!r}" for k, v in dict(values, TEMP_DIR=tmp).items()],
                                 params_path=os.path.join(ROOT, 'params.py'))
        for name in args.candidates.split(','):
            channels, fc = (int(p[1:]) for p in name.split('-'))
            build = functools.partial(ss.AFNet, ss.generate_config(channels, fc, 1250))
            float_path = os.path.join(tmp, f'{name}.onnx')
            result = run_trial(build, 0.0015, data, settings, float_path, progress=False,
                               latency=False)
            log(f"{name}: float {result.epochs} epochs (best {result.best_epoch}), "
                f"{result.onnx_bytes:,} bytes")
            floats = {s: logits(float_path, x, True) for s, x, _ in splits}
            for reduce_range in (False, True):
                path = os.path.join(tmp, f'{name}-{reduce_range}.int8.onnx')
                size = quantize_int8(float_path, path, calibration, reduce_range=reduce_range)
                for split_name, x, y in splits:
                    kernels, exact = logits(path, x, False), logits(path, x, True)
                    log(f"  {'7-bit' if reduce_range else '8-bit'} weights ({size:,} B) "
                        f"{split_name:4}: min4 float {min4(floats[split_name], y):.3f}, "
                        f"kernels {min4(kernels, y):.3f}, exact {min4(exact, y):.3f}; "
                        f"max |kernels - exact| {np.abs(kernels - exact).max():.4f}, same "
                        f"class {np.mean(kernels.argmax(1) == exact.argmax(1)):.2%}")


if __name__ == '__main__':
    main()
