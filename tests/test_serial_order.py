"""One answer whatever the timing: for any completion order, any number of workers and any
interruption point, both stages record the serial search's rows, avoid.txt lines, best
folders, summary and stage-two result, exactly as WORKERS=1.

A ShuffledExecutor stands in for Ray: it holds up to `capacity` jobs and, at each wait(),
finishes a random subset of them in a random order (seeded), so that hundreds of
completion orders run in seconds. It can also raise KeyboardInterrupt at a random wait()
(the driver stopped), after which the test resumes the search with a fresh stage, as a
rerun does. Trials are canned (bookkeeping under test, not training): each candidate's
result is a real TinyNet state dict and exported ONNX file, made once, with the score a
scenario gives it.
"""
import copy
import os
import random

import pytest
import torch

from conftest import TinyNet, TinyNetB
from public.search.executor import Outcome, SerialExecutor
from public.core.interrupts import NoInterrupts
from public.results.table import ResultsTable, STAGE1_COLUMNS, STAGE2_COLUMNS, TIMING_COLUMNS
from public.search.stage_one import result_folders, run_stage_one
from public.train.outcome import TrialResult, TrialStatus
import public.search.stage_two as scaling
from public.compress.export import export_onnx

ORDERS = 45              # completion orders per stage scenario set (x 2 scenario sets x 2 stages)


class ShuffledExecutor:
    """Runs jobs in-process, finishing them in a seeded random order; capacity workers."""

    def __init__(self, data, capacity, rng, interrupt_at=None):
        self.data, self.capacity, self.rng = data, capacity, rng
        self.interrupt_at, self.waits = interrupt_at, 0
        self._pending = {}

    def submit(self, job):
        assert job.key not in self._pending
        self._pending[job.key] = job

    def pending(self):
        return list(self._pending.values())

    def cancel(self, job):
        return self._pending.pop(job.key, None) is not None

    def wait(self, timeout=None):
        self.waits += 1
        if self.interrupt_at is not None and self.waits >= self.interrupt_at:
            raise KeyboardInterrupt('SIGINT')
        keys = list(self._pending)
        done = self.rng.sample(keys, self.rng.randint(1, len(keys)))
        out = []
        for key in done:
            job = self._pending.pop(key)
            out.append(Outcome(job, ok=True, result=job.fn(job.payload, self.data), node='n1'))
        return out

    def shutdown(self):
        self._pending.clear()


class CannedTrainer:
    """The scenario's outcome per trial key, as a real exported TinyNet (made once)."""
    cache = {}

    def __init__(self, scores):
        self.scores = scores

    def __call__(self, build_model, lr, data, settings, onnx_path, progress=True, desc='', **kw):
        value = self.scores[desc]
        if value == 'diverged':
            return TrialResult(status=TrialStatus.DIVERGED, stop_reason='diverged', epochs=1)
        if desc not in self.cache:
            torch.manual_seed(sum(map(ord, desc)))
            model = build_model()
            size = export_onnx(model, onnx_path, data.in_channels, data.input_size,
                               settings.ONNX_OPSET)
            with open(onnx_path, 'rb') as f:
                self.cache[desc] = (model.state_dict(), f.read(), size,
                                    sum(p.numel() for p in model.parameters()))
        state, onnx, size, params = self.cache[desc]
        metrics = dict(f1=value, accuracy=value, precision=value, recall=min(1.0, value + 0.01))
        return TrialResult(status=TrialStatus.OK, stop_reason='max-epochs', epochs=2, best_epoch=2,
                           val_metrics=metrics, test_metrics=dict(metrics), onnx_bytes=size,
                           onnx=onnx, latency_ms=0.1, params=params,
                           state_dict=copy.deepcopy(state), history=[(1, 0.5, 0.6, lr)])


def _drive(run, rng, max_interrupts=3):
    """Run the search to its end through ShuffledExecutors, interrupting it at random."""
    for attempt in range(max_interrupts + 1):
        capacity = rng.randint(2, 5)
        interrupt = rng.randint(1, 6) if attempt < max_interrupts and rng.random() < 0.6 else None
        executor = ShuffledExecutor(None, capacity, rng, interrupt)
        try:
            return run(executor)
        except KeyboardInterrupt:
            continue
    raise AssertionError('unreachable')


def _serial_rows(path, columns):
    rows = ResultsTable(path, columns).rows() if os.path.exists(path) else []
    return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS}
            for r in rows if r['status'] != 'speculative']


# ----------------------------------------------------------------------------- stage one

MODELS = [TinyNet, TinyNetB]
GRID = dict(LR_MIN=0.001, LR_MAX=0.008, STEP=0.001, AVOID_PARAM=0.8, STAGE1_TARGET=97)


def _stage_one_scenario(seed):
    rng = random.Random(seed)
    scores = {}
    for model in MODELS:
        for i in range(8):
            pick = rng.random()
            scores[f"{model.__name__}@{round(0.001 * (i + 1), 3)}"] = (
                'diverged' if pick < 0.1 else round(rng.uniform(0.5, 0.79), 4) if pick < 0.35
                else round(rng.uniform(0.97, 0.99), 4) if pick < 0.42
                else round(rng.uniform(0.8, 0.96), 4))
    return scores


def _stage_one_state(settings):
    root = settings.MODEL_SAVE_PATH
    folders = {}
    for model in MODELS:
        model_dir = os.path.join(root, model.__name__)
        for folder in result_folders(model_dir):
            path = os.path.join(model_dir, folder)
            state = torch.load(os.path.join(path, 'saved.pth'), weights_only=True)
            folders[(model.__name__, folder)] = (
                sorted(os.listdir(path)), {k: v.tolist() for k, v in state.items()},
                open(os.path.join(path, 'evaluation_metrics.txt')).read())
    avoid = open(settings.AVOID_FILE_PATH).read() if os.path.exists(settings.AVOID_FILE_PATH) else ''
    summary = open(os.path.join(root, 'summary.csv')).read().splitlines()
    wall = summary[0].split(',').index('wall_s')
    summary = [','.join(c for i, c in enumerate(line.split(',')) if i != wall).replace(root, '<root>')
               for line in summary]
    return dict(rows=_serial_rows(os.path.join(root, 'results.csv'), STAGE1_COLUMNS),
                avoid=avoid, folders=folders, summary=summary)


def _run_stage_one(settings, prepared, trainer, executor):
    run_stage_one(settings, prepared, MODELS, NoInterrupts(), log=lambda m: None,
                  progress=False, executor=executor, trainer=trainer)


@pytest.mark.parametrize('scenario', [1, 2])
def test_stage_one_any_completion_order_and_interruption_gives_the_serial_answer(
        scenario, prepared, make_settings, tmp_path):
    scores = _stage_one_scenario(scenario)
    trainer = CannedTrainer(scores)
    serial = make_settings(MODEL_SAVE_PATH=str(tmp_path / 'serial'),
                           AVOID_FILE_PATH=str(tmp_path / 'serial-avoid.txt'), **GRID)
    _run_stage_one(serial, prepared, trainer, SerialExecutor(prepared))
    expected = _stage_one_state(serial)
    assert expected['rows'] and expected['folders']
    speculative = 0
    for order in range(ORDERS):
        rng = random.Random(1000 * scenario + order)
        settings = make_settings(MODEL_SAVE_PATH=str(tmp_path / f'o{order}'),
                                 AVOID_FILE_PATH=str(tmp_path / f'o{order}-avoid.txt'), **GRID)

        def run(executor):
            executor.data = prepared
            return _run_stage_one(settings, prepared, trainer, executor)
        _drive(run, rng)
        got = _stage_one_state(settings)
        for part in ('rows', 'avoid', 'folders', 'summary'):
            assert got[part] == expected[part], f"order {order}: {part} differ"
        table = ResultsTable(os.path.join(settings.MODEL_SAVE_PATH, 'results.csv'),
                             STAGE1_COLUMNS).rows()
        speculative += sum(r['status'] == 'speculative' for r in table)
    assert speculative > 0, 'the orders must include outcomes the serial search never uses'


def test_dispatch_prefers_candidates_no_earlier_one_can_prune(prepared, make_settings):
    from public.search.stage_one import StageOne
    settings = make_settings(**GRID)
    os.makedirs(settings.MODEL_SAVE_PATH)
    stage = StageOne(settings, prepared, MODELS, log=lambda m: None, progress=False)
    stage.start()
    keys = [stage.next_job().key for _ in range(3)]
    # The serial head first; then the next model's first rate (no earlier candidate of its
    # model is open, so nothing can prune it); then every open rate has an open neighbour
    # within 2*STEP before it, so the rest go in serial order: TinyNet@0.002.
    assert keys[:2] == ['TinyNet@0.001', 'TinyNetB@0.001']
    assert keys[2] == 'TinyNet@0.002'


# ----------------------------------------------------------------------------- stage two

SCALES = dict(CHANNEL_SCALES=(1, 2, 3, 4, 5, 6), FC_SCALES=(1,), SIZE_TARGET_KB=1000,
              METRIC_TARGET=95)


@pytest.fixture(scope='module')
def cached_plan():
    plans = {}
    real = scaling.plan_candidates

    def plan(settings, *args, **kw):
        key = (settings.CHANNEL_SCALES, settings.FC_SCALES)
        if key not in plans:
            plans[key] = real(settings, *args, **kw)
        return copy.deepcopy(plans[key])
    return plan


def _stage_two_scenario(seed, names):
    rng = random.Random(seed)
    return {n: ('diverged' if rng.random() < 0.15 else round(rng.uniform(0.85, 0.965), 4))
            for n in names}


def _stage_two_state(settings, folder, met):
    files = {}
    if folder:
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if name == 'saved.pth':
                files[name] = {k: v.tolist() for k, v in
                               torch.load(path, weights_only=True).items()}
            elif name in ('saved.onnx', 'evaluation_metrics.txt', 'per_subject.csv'):
                files[name] = open(path, 'rb').read()
            else:
                files[name] = None          # params_used.py and result.json name the paths
    return dict(rows=_serial_rows(os.path.join(settings.TEMP_DIR, 'stage2_results.csv'),
                                  STAGE2_COLUMNS),
                folder=os.path.basename(folder) if folder else None, met=met, files=files)


@pytest.mark.parametrize('scenario', [1, 2, 3])
def test_stage_two_any_completion_order_and_interruption_gives_the_serial_answer(
        scenario, prepared, make_settings, tmp_path, monkeypatch, cached_plan):
    monkeypatch.setattr(scaling, 'plan_candidates', cached_plan)
    names = [f"c{c}-f1" for c in SCALES['CHANNEL_SCALES']]
    scores = _stage_two_scenario(scenario, names)
    trainer = CannedTrainer({n: scores[n] for n in names})

    stage_two_orders_give_the_serial_answer(prepared, make_settings, tmp_path, trainer,
                                            5000 * scenario, **SCALES)


def stage_two_orders_give_the_serial_answer(prepared, make_settings, tmp_path, trainer, seed,
                                            orders=ORDERS, **values):
    """Stage two with `values` run serially, then in `orders` seeded completion orders with
    interruptions: every run records the serial rows, folder, verdict and files. Returns
    the serial run's state."""
    def settings_for(tag):
        return make_settings(TEMP_DIR=str(tmp_path / tag / 'temp'),
                             FINAL_RESULT_DIR=str(tmp_path / tag / 'final'), **values)

    def run_with(settings, executor):
        return scaling.run_stage_two(settings, prepared, NoInterrupts(), log=lambda m: None,
                                     progress=False, trainer=trainer, executor=executor)
    serial = settings_for('serial')
    folder, met, _ = run_with(serial, SerialExecutor(prepared))
    expected = _stage_two_state(serial, folder, met)
    for order in range(orders):
        rng = random.Random(seed + order)
        settings = settings_for(f'o{order}')

        def run(executor):
            executor.data = prepared
            return run_with(settings, executor)
        folder, met, _ = _drive(run, rng)
        got = _stage_two_state(settings, folder, met)
        for part in ('rows', 'folder', 'met', 'files'):
            assert got[part] == expected[part], f"order {order}: {part} differ"
    return expected
