"""What a trial checkpoint costs per epoch: its bytes and the time of one save
(public/train/loop.py _save_checkpoint: torch.save to bytes, one atomic write), for stage
one's AFNet and stage two's c1-f1, at the demo's input (1250 samples, 1 lead), after a
real epoch (the optimizer's moments and the best weights are in it).

    python bench/bench_checkpoint.py          # prints one line per model
"""
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from public.core.settings import load_settings  # noqa: E402
from public.data.prepare import TrialData  # noqa: E402
from public.model import AFNet as StageOneAFNet  # noqa: E402
from public.ss_model import AFNet as StageTwoAFNet, generate_config  # noqa: E402
from public.train import loop  # noqa: E402


def measure(name, model, folder, repeats=20):
    torch.set_num_threads(1)
    g = np.random.default_rng(0)
    x = torch.from_numpy(g.standard_normal((64, 1, 1250)).astype(np.float32))
    y = torch.from_numpy(g.integers(0, 2, 64))
    settings = load_settings(['NUM_EPOCHS=1', 'BATCH_SIZE=32'])
    path = os.path.join(folder, name, 'state.pt')
    loop.train_model(model, TrialData(x, y, x, y), 0.003, settings, torch.device('cpu'),
                     progress=False, checkpoint=path)
    state = torch.load(path, weights_only=False)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loop._save_checkpoint(path, state)
        times.append(1000 * (time.perf_counter() - start))
    params = sum(p.numel() for p in model.parameters())
    print(f"{name}: {params} parameters, checkpoint {os.path.getsize(path)} bytes, "
          f"save median {np.median(times):.1f} ms (min {min(times):.1f}, max {max(times):.1f}) "
          f"over {repeats}")


if __name__ == '__main__':
    with tempfile.TemporaryDirectory() as folder:
        measure('AFNet', StageOneAFNet(input_size=1250), folder)
        measure('c1-f1', StageTwoAFNet(generate_config(1, 1, 1250)), folder)
