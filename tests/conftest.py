"""Shared fixtures of the ATML test suite: a small real data set, settings and CLI helpers.

Speed matters (the whole suite runs in a few minutes on 2 CPU cores), so:
- `small_data` copies 8 subjects x 12 segments of ttdata/train and 2 subjects x 8 of
  ttdata/test once per session (1250 samples each, the demo's real format);
- `make_settings(...)` gives validated settings with 1 epoch, one learning rate and every
  output path inside the test's tmp_path;
- `prepared` is the parsed and split small data set, shared by in-process trials;
- `TinyNet` is a real, very small model for tests of the search bookkeeping.
"""
import collections
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from public.core.settings import load_settings  # noqa: E402

# One torch thread, like params.py's NUM_THREADS default: on a shared 2-core machine more
# threads make these tiny convnets many times slower, not faster.
torch.set_num_threads(1)

PARAMS = ROOT / 'params.py'
INPUT_SIZE = 1250

# Settings that keep a trial to a fraction of a second on the small data set.
FAST = dict(NUM_EPOCHS=1, LR_MIN=0.003, LR_MAX=0.003, STEP=0.0005, LATENCY_RUNS=2,
            DEVICE='cpu', NUM_THREADS=1, BATCH_SIZE=32, AVOID_PARAM=0.0, STAGE1_TARGET=100,
            WORKERS=1)


AFNET_SS_MODEL = ROOT / 'examples' / 'ss_model_afnet.py'     # the pre-issue-20 stage two


def load_ss_model(path=AFNET_SS_MODEL, name=None):
    """A drop-in public/ss_model.py file (default: the AFNet width scaling of examples/)
    loaded as a module of its own, without touching public.ss_model."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name or f"ss_model_{Path(path).stem}",
                                                  str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def afnet_stage_two(monkeypatch):
    """examples/ss_model_afnet.py in the place of public/ss_model.py for stage two: for the
    tests of the AFNet scaling itself (its widths, its FC layer that grows with the input)."""
    import public
    module = load_ss_model()
    monkeypatch.setitem(sys.modules, 'public.ss_model', module)
    monkeypatch.setattr(public, 'ss_model', module, raising=False)
    return module


def write_segment(path, values=None, text=None):
    """Write one segment file: `values` one per line (rows of several values = leads)."""
    if text is None:
        values = np.asarray(values)
        if values.ndim == 1:
            text = ''.join(f"{v:.4f}\n" for v in values)
        else:
            text = ''.join(' '.join(f"{v:.4f}" for v in row) + '\n' for row in values)
    Path(path).write_text(text)
    return Path(path)


def _copy_subset(src, dst, subjects, per_rhythm):
    groups = collections.defaultdict(list)
    for name in sorted(os.listdir(src)):
        subject, rhythm, _ = name.split('-')
        groups[(subject, rhythm)].append(name)
    chosen = sorted({s for s, _ in groups})[:subjects]
    dst.mkdir(parents=True)
    for subject in chosen:
        for rhythm in ('AFIB', 'N'):
            for name in groups[(subject, rhythm)][:per_rhythm]:
                shutil.copy(os.path.join(src, name), dst / name)
    return dst


@pytest.fixture(scope='session')
def small_data(tmp_path_factory):
    """8 train subjects x (6 AFIB + 6 N) and 2 test subjects x (4 + 4), from ttdata/."""
    root = tmp_path_factory.mktemp('small-data')
    train = _copy_subset(ROOT / 'ttdata' / 'train', root / 'train', subjects=8, per_rhythm=6)
    test = _copy_subset(ROOT / 'ttdata' / 'test', root / 'test', subjects=2, per_rhythm=4)
    return SimpleNamespace(root=root, train=train, test=test, cache=root / 'cache')


def settings_values(tmp_path, data, **overrides):
    """{NAME: value} overrides: small data, fast training, every output inside tmp_path."""
    values = dict(DATA_DIR=str(data.train), TEST_DIR=str(data.test), CACHE_DIR=str(data.cache),
                  MODEL_SAVE_PATH=str(tmp_path / 'multi-result'), TEMP_DIR=str(tmp_path / 'temp'),
                  AVOID_FILE_PATH=str(tmp_path / 'avoid.txt'),
                  FINAL_RESULT_DIR=str(tmp_path / 'final'), **FAST)
    values.update(overrides)
    return values


@pytest.fixture
def make_settings(tmp_path, small_data):
    """make_settings(**overrides) -> validated settings (through load_settings' overrides)."""
    def make(**overrides):
        values = settings_values(tmp_path, small_data, **overrides)
        return load_settings([f"{k}={v!r}" for k, v in values.items()], params_path=str(PARAMS))
    return make


@pytest.fixture(scope='session')
def prepared(small_data, tmp_path_factory):
    """The small data set parsed, split by subject and on the CPU (shared, read-only)."""
    from public.data.prepare import prepare_data
    out = tmp_path_factory.mktemp('prepared')
    values = settings_values(out, small_data)
    settings = load_settings([f"{k}={v!r}" for k, v in values.items()], params_path=str(PARAMS))
    return prepare_data(settings, progress=False)


class TinyNet(nn.Module):
    """A real but very small classifier (input (N, C, L, 1)) for search bookkeeping tests."""

    def __init__(self, input_size=1250, in_channels=1, num_classes=2):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, 4, 9, stride=4)
        self.bn = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x.squeeze(-1)))).mean(dim=2))


class TinyNetB(TinyNet):
    """A second model name, to check that scoped avoid.txt entries stay with their model."""


# ----------------------------------------------------------------------------- CLI helpers

def write_params(folder, **values):
    """Copy the project's params.py into folder and append `NAME = value` overrides."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = PARAMS.read_text() + '\n# ---- test overrides\n'
    text += ''.join(f"{k} = {v!r}\n" for k, v in values.items())
    path = folder / 'params.py'
    path.write_text(text)
    return path


def run_script(script, cwd, *args, params=None, timeout=240):
    """Run python <ROOT>/<script> --params <cwd>/params.py ARGS in cwd; CompletedProcess."""
    params = params or Path(cwd) / 'params.py'
    return subprocess.run([sys.executable, str(ROOT / script), '--params', str(params), *args],
                          cwd=str(cwd), capture_output=True, text=True, timeout=timeout,
                          env=_script_env())


def start_script(script, cwd, *args, params=None):
    """Start the script (for SIGINT tests); stdout+stderr go to cwd/run.log."""
    params = params or Path(cwd) / 'params.py'
    log = open(Path(cwd) / 'run.log', 'w')
    proc = subprocess.Popen([sys.executable, str(ROOT / script), '--params', str(params), *args],
                            cwd=str(cwd), stdout=log, stderr=subprocess.STDOUT, env=_script_env())
    proc.log_file = log
    return proc


def _script_env():
    env = dict(os.environ)
    env['PYTHONUNBUFFERED'] = '1'
    env.pop('CUDA_VISIBLE_DEVICES', None)
    return env


def output(proc):
    return proc.stdout + proc.stderr


@pytest.fixture(scope='module')
def seed_models():
    """public.models.seed, imported for one test module only (registry restored afterwards),
    so the registry-wide tests see exactly public/model.py's models."""
    import importlib
    import sys

    import public
    import public.models.registry as registry
    before = dict(registry._REGISTRY)
    fresh = 'public.models.seed' not in sys.modules
    module = importlib.import_module('public.models.seed')
    yield module
    registry._REGISTRY.clear()
    registry._REGISTRY.update(before)
    if fresh:        # a later import must run (and register) again
        sys.modules.pop('public.models.seed', None)
        vars(public).pop('seed_models', None)


@pytest.fixture
def two_node_cluster(monkeypatch):
    """Ray's own cluster_utils.Cluster on this machine: a head and one worker node, 1 CPU
    each, every file of it in one short /tmp folder (Unix socket paths are limited to 107
    bytes), removed afterwards. Cluster writes the head's address to
    <RAY_TMPDIR or /tmp>/ray/ray_current_cluster whatever temp_dir says, and fails where
    that folder does not exist yet (a fresh machine): RAY_TMPDIR points it into the folder."""
    import tempfile
    ray = pytest.importorskip('ray')
    from ray.cluster_utils import Cluster
    assert not ray.is_initialized()
    temp = tempfile.mkdtemp(prefix='cl-', dir='/tmp')
    os.makedirs(os.path.join(temp, 'ray'))
    monkeypatch.setenv('RAY_TMPDIR', temp)
    cluster = None
    try:
        cluster = Cluster(initialize_head=True,
                          head_node_args={'num_cpus': 1, 'temp_dir': temp})
        # Both "nodes" share one session folder on this machine: without their own
        # runtime_resources folder, the second node's agent would re-unpack the shipped
        # working_dir (rmtree + unzip) under a worker the first one already started there.
        cluster.add_node(num_cpus=1, runtime_env_dir_name='runtime_resources_node2')
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


# ----------------------------------------------------------------------------- /proc helpers

def proc_stat(pid):
    """(state, ppid, start time) of a process from /proc, or None if it is gone."""
    try:
        text = Path(f'/proc/{pid}/stat').read_text()
    except OSError:
        return None
    fields = text[text.rindex(')') + 2:].split()
    return fields[0], int(fields[1]), fields[19]


def descendants(root):
    """{pid: start time} of every process below root."""
    stats = {int(p): s for p in os.listdir('/proc') if p.isdigit() and (s := proc_stat(p))}
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (_, ppid, start) in stats.items():
            if ppid == parent and pid not in found:
                found[pid] = start
                frontier.append(pid)
    return found


def interrupt_after(monkeypatch, after, run, checkpoint):
    """Call run() (a trial with a checkpoint) and Ctrl+C it (KeyboardInterrupt) once
    `after` epochs are done; the checkpoint then holds epoch `after`."""
    from public.train import loop
    real, calls = loop._train_epoch, []

    def epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(loop, '_train_epoch', epoch)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(loop, '_train_epoch', real)
    assert torch.load(checkpoint, weights_only=False)['epoch'] == after
