"""Training-step time of the stage-two architectures at their largest 20 KB INT8 candidate.

    python bench/bench_ss_step.py                 # 5 repeats of 40 steps each, 1 thread
    python bench/bench_ss_step.py --repeats 7 --steps 60 --batch 32

One step = forward, cross-entropy, backward and an Adam update on a random batch
(BATCH_SIZE 32 of 1 x 1250 samples), one torch thread (as a trial in a worker). Models:
the AFNet width scaling c1-f5 (examples/ss_model_afnet.py, 19.8 KB INT8), BudgetNet c4-f4
with the default stride-4 stem (public/ss_model.py, 19.7 KB) and with a stride-2 stem (the
first design). Prints the machine, each model's median ms per step with min-max over the
repeats, and the ratios to AFNet, measured in this one run (interleaved repeats).
"""
import argparse
import importlib.util
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'bench'))


def load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3],
                                                  os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def step_ms(model, steps, batch, seed=0):
    import torch
    from torch import nn
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 1250, 1, generator=g)
    y = torch.randint(0, 2, (batch,), generator=g)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    model.train()
    for i in range(steps + 3):
        if i == 3:                       # 3 warm-up steps
            start = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return (time.perf_counter() - start) / steps * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--steps', type=int, default=40)
    parser.add_argument('--batch', type=int, default=32)
    args = parser.parse_args()
    import torch
    torch.set_num_threads(1)
    from real_data import cpu_name, cpu_vnni
    from public.models.budget import BudgetNet, budget_config
    afnet = load('examples/ss_model_afnet.py')
    models = {
        'AFNet scaling c1-f5': lambda: afnet.AFNet(afnet.generate_config(1, 5, 1250)),
        'BudgetNet c4-f4 (stem stride 4)': lambda: BudgetNet(budget_config(4, 4, 1250)),
        'BudgetNet c4-f4 (stem stride 2)': lambda: BudgetNet(budget_config(4, 4, 1250,
                                                                           stem_stride=2)),
    }
    print(f"bench_ss_step: {os.cpu_count()} CPU cores, {cpu_name()} "
          f"({cpu_vnni() or 'no VNNI'}); 1 torch thread, batch {args.batch}, "
          f"{args.repeats} repeats x {args.steps} steps, torch {torch.__version__}")
    times = {name: [] for name in models}
    for r in range(args.repeats):
        for name, build in models.items():
            torch.manual_seed(r)
            times[name].append(step_ms(build(), args.steps, args.batch, seed=r))
    base = statistics.median(times['AFNet scaling c1-f5'])
    for name, t in times.items():
        m = statistics.median(t)
        print(f"  {name:33} {m:7.2f} ms/step  [{min(t):.2f}-{max(t):.2f}]  "
              f"{m / base:.2f}x AFNet")


if __name__ == '__main__':
    main()
