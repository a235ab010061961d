"""Kill a small search right after each of its durable write steps, rerun it, and compare.

    python tests/crash_driver.py stage1|stage2 WORK TRAIN_DIR TEST_DIR CACHE_DIR

1. An uninterrupted reference run records its write steps (ATML_STEP_LOG): N steps.
2. For every k in 1..N, a fresh run is killed with SIGKILL right after step k
   (ATML_KILL_AT_STEP=k), then the same search runs again to its end.
3. The final state on disk (results table up to timing columns, avoid.txt entries, every
   file of the results folders, summary) must equal the reference's.
Each run is a forked child of this process (torch is imported once, data parsed once):
deterministic, no timing involved. The kill points run side by side, one per core. Prints one JSON line: {"steps": N, "mismatches": [...]}.
"""
import json
import os
import shutil
import signal
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import torch  # noqa: E402

torch.set_num_threads(1)

from conftest import PARAMS, TinyNet  # noqa: E402
from public.core.settings import load_settings  # noqa: E402
from public.core.interrupts import NoInterrupts  # noqa: E402
from public.results.table import ResultsTable, TIMING_COLUMNS  # noqa: E402

VOLATILE_JSON = ('latency_ms', 'wall_s', 'node', 'attempts')


def settings_for(stage, root, train, test, cache):
    values = dict(DATA_DIR=train, TEST_DIR=test, CACHE_DIR=cache,
                  MODEL_SAVE_PATH=os.path.join(root, 'multi-result'),
                  TEMP_DIR=os.path.join(root, 'temp'), AVOID_FILE_PATH=os.path.join(root, 'avoid.txt'),
                  FINAL_RESULT_DIR=os.path.join(root, 'final'), NUM_EPOCHS=1, LATENCY_RUNS=1,
                  DEVICE='cpu', NUM_THREADS=1, WORKERS=1, BATCH_SIZE=32, STAGE1_TARGET=100,
                  LR_MIN=0.001, LR_MAX=0.005, STEP=0.001, AVOID_PARAM=0.55,
                  CHANNEL_SCALES=(1, 2, 5), FC_SCALES=(1,), METRIC_TARGET=90, SIZE_TARGET_KB=60)
    return load_settings([f"{k}={v!r}" for k, v in values.items()], params_path=str(PARAMS))


# Real trials (training, export, ONNX check) whose scores are then set by this script, so
# that the search takes every bookkeeping path: a best replaced by a better one, a pruned
# rate and its pruned neighbours, a stage-two winner that is not the first candidate.
SCORES = {'TinyNet@0.001': 0.60, 'TinyNet@0.002': 0.40, 'TinyNet@0.005': 0.70,
          'c1-f1': 0.50, 'c2-f1': 0.95}


def scripted(build_model, lr, data, settings, onnx_path, progress=True, desc='', **kw):
    from public.search.trial import run_trial
    result = run_trial(build_model, lr, data, settings, onnx_path, progress=progress, desc=desc)
    v = SCORES.get(desc, 0.3)
    result.val_metrics = result.test_metrics = dict(f1=v, accuracy=v, precision=v, recall=v)
    return result


def run(stage, settings, data):
    if stage == 'stage1':
        from public.search.stage_one import run_stage_one
        run_stage_one(settings, data, [TinyNet], NoInterrupts(), log=lambda m: None,
                      progress=False, trainer=scripted)
    else:
        from public.search.stage_two import run_stage_two
        run_stage_two(settings, data, NoInterrupts(), log=lambda m: None, progress=False,
                      trainer=scripted)


def in_child(stage, settings, data, env):
    """Run the search in a forked child with `env` set; its exit status (negative: signal)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.environ.update(env)
            run(stage, settings, data)
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def snapshot(root):
    """The final state, minus what legitimately differs between runs (timing, pids)."""
    state = {}
    for table in ('multi-result/results.csv', 'temp/stage2_results.csv'):
        path = os.path.join(root, table)
        if os.path.exists(path):
            state[table] = [{k: v for k, v in r.items() if k not in TIMING_COLUMNS}
                            for r in ResultsTable(path, []).rows()]
    avoid = os.path.join(root, 'avoid.txt')
    if os.path.exists(avoid):
        from public.search.avoid import AvoidList
        state['avoid.txt'] = sorted((lr, m, key) for lr, m, _, key in AvoidList(avoid, 0.001).entries)
    for top in ('multi-result', 'temp', 'final'):
        for folder, dirs, files in os.walk(os.path.join(root, top)):
            dirs.sort()
            for name in sorted(files):
                rel = os.path.relpath(os.path.join(folder, name), root)
                if name in ('.atml.lock', 'results.csv', 'stage2_results.csv') and folder.endswith(('multi-result', 'temp')):
                    continue
                state[rel] = _content(os.path.join(folder, name), root)
    return state


def _content(path, root):
    """A file's content with the run's own folder name replaced (paths in params_used.py)."""
    name = os.path.basename(path)
    if name == 'result.json':
        with open(path) as f:
            info = json.load(f)
        return {k: v for k, v in info.items() if k not in VOLATILE_JSON}
    if name in ('summary.csv', 'stage2_results.csv'):
        import csv
        with open(path, newline='') as f:
            return [{k: v.replace(root, '<root>') for k, v in r.items() if k not in TIMING_COLUMNS}
                    for r in csv.DictReader(f)]
    if name == 'saved.pth':
        state = torch.load(path, weights_only=True)
        return {k: v.tolist() for k, v in state.items()}
    with open(path, 'rb') as f:
        return f.read().replace(root.encode(), b'<root>').hex()


def diff(a, b):
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k)]


def case(stage, work, k, steps, reference, train, test, cache, data):
    """Kill a run right after step k, rerun it, compare with the reference: writes
    work/case-<k>.json ({} when equal, else what differs)."""
    root = os.path.join(work, f"kill-{k}")
    settings = settings_for(stage, root, train, test, cache)
    killed = in_child(stage, settings, data, {'ATML_KILL_AT_STEP': str(k)})
    resumed = in_child(stage, settings, data, {})
    got = snapshot(root)
    outcome = {}
    if killed != -signal.SIGKILL or resumed != 0 or got != reference:
        outcome = {'step': k, 'after': steps[k - 1], 'killed': killed, 'resumed': resumed,
                   'differs': diff(reference, got)[:6]}
    else:
        shutil.rmtree(root)
    with open(os.path.join(work, f"case-{k}.json"), 'w') as f:
        json.dump(outcome, f)


def _reap(running):
    pid, _ = os.wait()
    running.pop(pid, None)


def main(stage, work, train, test, cache):
    from public.data.prepare import prepare_data
    ref_root = os.path.join(work, 'reference')
    settings = settings_for(stage, ref_root, train, test, cache)
    data = prepare_data(settings, progress=False)
    log = os.path.join(work, 'steps.log')
    if in_child(stage, settings, data, {'ATML_STEP_LOG': log}) != 0:
        print(json.dumps({'error': 'the reference run failed'}))
        return 1
    with open(log) as f:
        steps = [line.split(' ', 1)[1].strip() for line in f]
    reference = snapshot(ref_root)
    # The kill points are independent (each in its own folder): up to one case per core runs
    # at a time, each in a forked child that reports to work/case-<k>.json.
    running, width = {}, max(1, min(4, os.cpu_count() or 1))
    for k in range(1, len(steps) + 1):
        if len(running) >= width:
            _reap(running)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                case(stage, work, k, steps, reference, train, test, cache, data)
                code = 0
            except BaseException:
                import traceback
                traceback.print_exc()
            finally:
                os._exit(code)
        running[pid] = k
    while running:
        _reap(running)
    mismatches = []
    for k in range(1, len(steps) + 1):
        path = os.path.join(work, f"case-{k}.json")
        if not os.path.exists(path):
            mismatches.append({'step': k, 'after': steps[k - 1], 'error': 'the case crashed'})
            continue
        with open(path) as f:
            outcome = json.load(f)
        if outcome:
            mismatches.append(outcome)
    print(json.dumps({'steps': len(steps), 'names': steps, 'mismatches': mismatches}))
    return 0


if __name__ == '__main__':
    sys.exit(main(*sys.argv[1:]))
