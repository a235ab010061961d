"""Tests of public/search/executor.py: the serial executor, the Ray executor on a private local
instance (one, shared by the TestRayPrivate class), on a 2-node cluster, and Ctrl+C.

Every test that starts Ray has 'ray' in its name: `pytest tests/test_executor.py -k ray`
selects them, `-k "not ray"` leaves them out. The toy jobs are in tests/ray_jobs.py."""
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from conftest import descendants, proc_stat
import torch

from public.search.executor import (Job, Outcome, RayExecutor, SerialExecutor, SharedTensor,
                                    from_shareable, to_shareable)
from tests import ray_jobs

ROOT = Path(__file__).resolve().parents[1]


def make_data():
    return {'x': np.arange(1000.0), 't': torch.arange(12.0).reshape(3, 4), 'label': 'ecg'}


def run_all(ex, jobs, timeout=60):
    """Submit jobs, wait until none is pending; the outcomes in completion order."""
    for job in jobs:
        ex.submit(job)
    outcomes, deadline = [], time.time() + timeout
    while ex.pending():
        assert time.time() < deadline, f"jobs still pending: {ex.pending()}"
        outcomes += ex.wait(timeout=1)
    return outcomes


# ----------------------------------------------------------------------------- serial

def test_serial_runs_jobs_in_submission_order_in_process():
    data = make_data()
    with SerialExecutor(data) as ex:
        assert ex.capacity == 1
        jobs = [Job(f'j{i}', ray_jobs.scaled_sum, i) for i in (3, 1, 2)]
        for job in jobs:
            ex.submit(job)
        assert ex.pending() == jobs
        first = ex.wait()
        assert [o.job.key for o in first] == ['j3'] and ex.pending() == jobs[1:]
        rest = ex.wait() + ex.wait()
        assert ex.wait() == [] and ex.pending() == []
    outcomes = first + rest
    assert [o.job.key for o in outcomes] == ['j3', 'j1', 'j2']
    assert [o.result for o in outcomes] == [3 * 499500.0, 499500.0, 2 * 499500.0]
    assert all(o.ok and o.node == 'local' and o.attempts == 1 for o in outcomes)


def test_serial_cancel_drops_a_queued_job_and_duplicate_keys_are_refused():
    ex = SerialExecutor(make_data())
    a, b, c = (Job(k, ray_jobs.scaled_sum, 1) for k in 'abc')
    for job in (a, b, c):
        ex.submit(job)
    with pytest.raises(ValueError, match="'a' is already pending"):
        ex.submit(Job('a', ray_jobs.scaled_sum, 2))
    assert ex.cancel(b) is True and ex.cancel('b') is False
    assert [o.job.key for o in run_all(ex, [])] == ['a', 'c']


def test_serial_exception_becomes_a_failed_outcome_and_the_next_job_runs():
    ex = SerialExecutor(make_data())
    fail, ok = run_all(ex, [Job('bad', ray_jobs.fail, 7), Job('good', ray_jobs.scaled_sum, 1)])
    assert not fail.ok and fail.result is None and fail.attempts == 1
    assert fail.error.startswith('ValueError: bad payload 7')
    assert 'ray_jobs.py' in fail.error and 'raise ValueError' in fail.error
    assert 'executor.py' not in fail.error              # the executor's own frames left out
    assert ok.ok and ok.result == 499500.0


def test_serial_keyboard_interrupt_propagates():
    def interrupted(payload, data):
        raise KeyboardInterrupt
    ex = SerialExecutor(None)
    ex.submit(Job('k', interrupted, None))
    with pytest.raises(KeyboardInterrupt):
        ex.wait()


def test_serial_executor_never_imports_the_parallel_backend():
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from public.search.executor import Job, SerialExecutor
        from tests import ray_jobs
        with SerialExecutor({{'x': [1, 2]}}) as ex:
            ex.submit(Job('a', ray_jobs.scaled_sum, 2))
            [outcome] = ex.wait()
        assert outcome.ok and outcome.result == 6.0, outcome
        assert 'ray' not in sys.modules, 'ray was imported'
        print('ok')
    """)
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == 'ok', proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- sharing

@dataclasses.dataclass
class Holder:
    x: torch.Tensor
    y: np.ndarray
    parts: dict
    name: str = 'h'


def test_to_shareable_turns_tensors_into_numpy_and_back():
    holder = Holder(torch.ones(2, 3), np.zeros(4, np.int64),
                    {'a': [torch.arange(3), 5], 'b': (torch.zeros(1), 'text')})
    shared = to_shareable(holder)
    assert isinstance(shared.x, SharedTensor) and isinstance(shared.x.array, np.ndarray)
    assert isinstance(shared.parts['a'][0], SharedTensor) and shared.parts['a'][1] == 5
    assert isinstance(shared.parts['b'], tuple) and shared.parts['b'][1] == 'text'
    assert shared.y is holder.y                       # numpy stays numpy (zero-copy in Ray)
    assert isinstance(holder.x, torch.Tensor)         # the original is left alone
    back = from_shareable(shared)
    assert isinstance(back, Holder) and back.name == 'h'
    assert torch.equal(back.x, holder.x) and torch.equal(back.parts['a'][0], torch.arange(3))
    assert isinstance(back.y, np.ndarray)


def test_invalid_workers_value_is_refused_before_anything_starts():
    with pytest.raises(ValueError, match="workers must be 'auto' or an int >= 1"):
        RayExecutor(None, workers=0)


# ----------------------------------------------------------------------------- /proc helpers

def still_running(procs):
    """The processes of {pid: start time} that still run (not the same pid reused)."""
    alive = []
    for pid, start in procs.items():
        stat = proc_stat(pid)
        if stat and stat[2] == start and stat[0] != 'Z':
            alive.append(pid)
    return alive


def wait_gone(procs, seconds=5):
    deadline = time.time() + seconds
    while still_running(procs) and time.time() < deadline:
        time.sleep(0.1)
    return still_running(procs)


def start_time(pid):
    stat = proc_stat(pid)
    return {pid: stat[2]} if stat else {}


# ----------------------------------------------------------------------------- Ray, private

@pytest.fixture(scope='class')
def private(tmp_path_factory):
    """One private 2-worker Ray instance for the class; its temp_dir path is too long for
    Unix sockets, so the executor falls back to a short folder under /tmp."""
    ray = pytest.importorskip('ray')
    data, logs = make_data(), []
    temp = tmp_path_factory.mktemp('ray-temp-folder-with-a-long-name')
    with mock.patch.object(ray, 'put', wraps=ray.put) as put:
        ex = RayExecutor(data, workers=2, temp_dir=temp, log=logs.append)
    ns = type('Private', (), dict(ex=ex, data=data, logs=logs, puts=put.call_count, ray=ray,
                                  temp=temp))
    yield ns
    ex.shutdown()
    assert not ray.is_initialized()
    assert not os.path.exists(ex.ray_temp_dir), 'the /tmp fallback folder was left behind'


class TestRayPrivate:
    def test_ray_starts_quietly_in_a_short_temp_folder(self, private):
        ex = private.ex
        assert ex.capacity == 2 and private.ray.is_initialized()
        assert ex.ray_temp_dir.startswith('/tmp/ray-'), ex.ray_temp_dir
        assert any('too long for Unix socket paths' in line for line in private.logs)
        assert any(line.startswith('Ray: private local instance') for line in private.logs)
        assert not (private.temp / 'ray').exists()

    def test_ray_results_equal_in_process_results(self, private):
        ex, ray = private.ex, private.ray
        payloads = [0.5, 1, 2, 3, 4]
        outcomes = run_all(ex, [Job(f's{p}', ray_jobs.scaled_sum, p) for p in payloads])
        by_key = {o.job.key: o for o in outcomes}
        assert sorted(by_key) == sorted(f's{p}' for p in payloads)
        here = ray.get_runtime_context().get_node_id()[:8]
        for p in payloads:
            o = by_key[f's{p}']
            assert o.ok and o.attempts == 1 and o.node == here, o
            assert o.result == ray_jobs.scaled_sum(p, private.data)

    def test_ray_data_is_put_once_shared_zero_copy_and_converted_once_per_worker(self, private):
        ex, ray = private.ex, private.ray
        assert private.puts == 1
        ref = ex.data_ref
        with mock.patch.object(ray, 'put', wraps=ray.put) as put:
            outcomes = run_all(ex, [Job(f'd{i}', ray_jobs.describe_data, i) for i in range(6)])
        assert put.call_count == 0 and ex.data_ref is ref
        seen = [o.result for o in outcomes]
        for info in seen:
            assert info['x_type'] == 'ndarray' and not info['x_writeable']   # object store
            assert info['t_type'] == 'Tensor' and info['t_shape'] == (3, 4)
            assert info['t_sum'] == 66.0 and info['label'] == 'ecg' and info['threads'] == 1
        for pid in {info['pid'] for info in seen}:       # one conversion per worker process
            assert len({info['data_id'] for info in seen if info['pid'] == pid}) == 1

    def test_ray_keeps_capacity_and_cancel_drops_a_queued_job(self, private, tmp_path):
        ex = private.ex
        jobs = [Job(f'r{i}', ray_jobs.record, (str(tmp_path), f'r{i}', 0.4)) for i in range(5)]
        for job in jobs:
            ex.submit(job)
        assert ex.running() == jobs[:2] and ex.pending() == jobs
        assert ex.cancel(jobs[3]) is True
        outcomes, most = [], 0
        while ex.pending():
            most = max(most, len(ex.running()))
            outcomes += ex.wait(timeout=30)
        assert sorted(o.result for o in outcomes) == ['r0', 'r1', 'r2', 'r4']
        assert most <= 2 and not (tmp_path / 'r3.start').exists()
        spans = [(float((tmp_path / f'{n}.start').read_text()),
                  float((tmp_path / f'{n}.end').read_text())) for n in ('r0', 'r1', 'r2', 'r4')]
        for start, _ in spans:
            assert sum(s <= start < e for s, e in spans) <= 2, spans

    def test_ray_cancel_of_a_running_job_kills_it(self, private, tmp_path):
        ex = private.ex
        sleeper = Job('sleeper', ray_jobs.sleep_pid, {'dir': str(tmp_path), 'name': 'z', 's': 60})
        ex.submit(sleeper)
        pid_file = tmp_path / 'z.pid'
        deadline = time.time() + 30
        while not pid_file.exists() and time.time() < deadline:
            assert ex.wait(timeout=0.2) == []
        worker = start_time(int(pid_file.read_text()))
        assert ex.cancel(sleeper) is True
        assert ex.pending() == [] and ex.wait() == []
        assert wait_gone(worker) == []
        [after] = run_all(ex, [Job('after', ray_jobs.scaled_sum, 1)])
        assert after.ok

    def test_ray_exception_in_fn_is_a_failed_outcome_without_retry(self, private):
        [o] = run_all(private.ex, [Job('bad', ray_jobs.fail, 7)])
        assert not o.ok and o.attempts == 1 and len(o.node) == 8
        assert o.error.startswith('ValueError: bad payload 7'), o.error
        assert 'ray_jobs.py' in o.error and 'raise ValueError' in o.error

    def test_ray_worker_killed_once_is_retried(self, private, tmp_path):
        job = Job('k1', ray_jobs.die_first, {'dir': str(tmp_path), 'name': 'k1', 'times': 1})
        [o] = run_all(private.ex, [job])
        assert o.ok and o.result == 2 and o.attempts == 2, o
        assert any('k1: worker process died' in line and 'retrying once' in line
                   for line in private.logs)

    def test_ray_worker_killed_twice_fails_and_the_next_job_runs(self, private, tmp_path):
        job = Job('k2', ray_jobs.die_first, {'dir': str(tmp_path), 'name': 'k2', 'times': 9})
        outcomes = run_all(private.ex, [job, Job('next', ray_jobs.scaled_sum, 1)])
        by_key = {o.job.key: o for o in outcomes}
        dead = by_key['k2']
        assert not dead.ok and dead.attempts == 2
        assert dead.error.startswith('worker process died twice (retried once): '), dead.error
        assert len(list(tmp_path.glob('k2.attempt-*'))) == 2
        assert by_key['next'].ok and by_key['next'].result == 499500.0


# ----------------------------------------------------------------------------- Ray, cluster

def test_ray_cluster_of_two_nodes_runs_jobs_on_both_and_survives(tmp_path, monkeypatch,
                                                                two_node_cluster):
    import ray
    cluster = two_node_cluster
    logs = []
    with RayExecutor({'x': [1.0]}, address=cluster.address, log=logs.append) as ex:
        assert ex.capacity == 2
        jobs = [Job(f'n{i}', ray_jobs.sleep_pid, {'dir': str(tmp_path), 'name': f'n{i}',
                                                 's': 1}) for i in range(4)]
        outcomes = run_all(ex, jobs)
        nodes = {n['NodeID'][:8] for n in ray.nodes() if n['Alive']}
    assert all(o.ok for o in outcomes), '\n'.join(o.error for o in outcomes)
    assert {o.node for o in outcomes} == nodes and len(nodes) == 2
    assert all(o.result[0] == o.node for o in outcomes)
    for _, module_file in (o.result for o in outcomes):    # shipped as working_dir
        assert not module_file.startswith(str(ROOT)), module_file
    assert not ray.is_initialized()
    # only disconnected: the cluster still runs, found through RAY_ADDRESS this time
    monkeypatch.setenv('RAY_ADDRESS', cluster.address)
    with RayExecutor({'x': [2.0]}, log=logs.append) as ex:
        [o] = run_all(ex, [Job('again', ray_jobs.scaled_sum, 1)])
    assert o.ok and o.result == 2.0 and o.node in nodes
    assert all(line.startswith(f'Ray: cluster {cluster.address}, 2 node(s)') for line in logs)


# ----------------------------------------------------------------------------- Ray, Ctrl+C

DRIVER = """
import sys
sys.path.insert(0, {root!r})
from public.search.executor import Job, RayExecutor
from tests import ray_jobs
folder = sys.argv[1]
with RayExecutor(None, workers=2, address='local', temp_dir=folder, log=print) as ex:
    assert ex.ray_temp_dir == folder + '/ray', ex.ray_temp_dir
    for i in range(3):
        ex.submit(Job(f'j{{i}}', ray_jobs.sleep_pid, {{'dir': folder, 'name': f'j{{i}}', 's': 60}}))
    while ex.pending():
        ex.wait()
"""


@pytest.mark.parametrize('target', ['driver', 'group'])
def test_ray_sigint_in_the_driver_stops_every_process_of_its_instance(target):
    """SIGINT to the driver alone, or to its whole process group (Ctrl+C in a terminal)."""
    pytest.importorskip('ray')
    folder = tempfile.mkdtemp(prefix='ex-', dir='/tmp')   # short enough for Unix sockets
    env = dict(os.environ, PYTHONUNBUFFERED='1', RAY_ADDRESS='127.0.0.1:1')  # 'local' wins
    log = open(Path(folder) / 'driver.log', 'w')
    proc = subprocess.Popen([sys.executable, '-c', DRIVER.format(root=str(ROOT)), folder],
                            stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    try:
        pids = [Path(folder, f'j{i}.pid') for i in range(2)]
        deadline = time.time() + 60
        while not all(p.exists() for p in pids):
            assert proc.poll() is None and time.time() < deadline, \
                Path(folder, 'driver.log').read_text()
            time.sleep(0.1)
        time.sleep(0.3)
        procs = descendants(proc.pid)       # gcs, raylet, agents, workers
        workers = {}
        for p in pids:
            workers.update(start_time(int(p.read_text())))
        assert set(workers) <= set(procs) and len(procs) >= 4, procs
        started = time.time()
        if target == 'group':
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)
        took = time.time() - started
        output = Path(folder, 'driver.log').read_text()
        assert took < 10, f"the driver took {took:.1f} s to stop"
        assert 'KeyboardInterrupt' in output, output
        assert wait_gone(procs) == [], f"left running: {still_running(procs)}"
        assert not Path(folder, 'j2.pid').exists()      # the queued job never started
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
        shutil.rmtree(folder, ignore_errors=True)
