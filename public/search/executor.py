"""Where the jobs of a search run: in-process one at a time, or in parallel on Ray.

The driver (the search) keeps all bookkeeping; an executor only runs jobs and reports back.
Both executors share one interface and know nothing about ATML's stages:

    from public.search.executor import Job, RayExecutor, SerialExecutor

    def train_one(payload, data):              # module level: pickled by reference
        return payload['lr'] * len(data['x'])

    with RayExecutor(data, workers=2) as ex:   # or SerialExecutor(data): same calls
        for lr in (0.001, 0.002, 0.003):
            ex.submit(Job(key=f'AFNet@{lr}', fn=train_one, payload={'lr': lr}))
        while ex.pending():
            for outcome in ex.wait():          # the jobs that finished, in completion order
                print(outcome.job.key, outcome.ok, outcome.result or outcome.error)

- `submit` queues a job; at most `capacity` jobs run at once, the rest wait in the driver,
  where `cancel` can still drop them (a running job is force-cancelled instead).
- `wait()` blocks until at least one running job finishes and returns the Outcomes of all
  that finished; KeyboardInterrupt propagates, and leaving the `with` block (shutdown())
  force-cancels whatever still runs, so Ctrl+C stops every worker within seconds.
- A job whose fn raises comes back ok=False with the exception and the traceback's last
  lines (no retry). With Ray, a job whose worker process dies (kill -9, out of memory) is
  retried once; if it dies again it comes back ok=False, attempts=2. (Ray itself prints a
  '(raylet) A worker died or was killed ...' line when that happens; nothing else is
  printed: worker output goes to the Ray session's log files.)

A private local instance (no address) is this machine's alone and this run's alone:
- every Ray server binds 127.0.0.1 (GCS, raylet, object manager, the core workers of the
  driver and of the workers, the runtime-env agent): nothing listens on other interfaces;
- its processes end within a few seconds of the driver, even one killed with SIGKILL (the
  GCS and the raylet die with the driver; the agents give up on the dead GCS after
  _GCS_GONE_S instead of 60 s; the workers follow their raylet). The next start in the same
  temp folder stops anything an earlier killed run still left running (matched by its
  session folder on the command line, only for sessions whose driver is dead) and says so;
- SIGINT / SIGTERM keep the handlers the driver had before ray.init (GracefulInterrupts in
  the CLI), and a KeyboardInterrupt keeps its signal's name through Ray's calls, so a
  parallel run ends exactly like a serial one: 'Interrupted (SIGTERM)', status 130.
Attaching: an address where nothing answers fails within _REACH_S seconds with a
RayUnreachableError (an ATMLError: `error: ...`, status 2) naming it and what to check,
instead of ray.init's 150 s of C++ warnings.

How code and data reach Ray workers:
- Code: fn is pickled by reference (module + name), so workers import it. A private local
  instance is started with PYTHONPATH = the driver's own sys.path entries (outside the
  Python installation), inherited by the worker processes Ray starts, so workers import
  whatever the driver imports (`public.*`, test helpers) and Ray's pre-started workers are
  used as they are (a runtime_env would start new ones: 0.5-2 s more). When attaching to a
  cluster, the project folder is shipped as runtime_env working_dir (minus results, data,
  venvs, caches, see WORKING_DIR_EXCLUDES), so a user-edited public/model.py also runs on
  remote machines.
- Data: `ray.put(to_shareable(data))` once per executor; every task gets the same
  ObjectRef. numpy arrays are read zero-copy from the node's shared object store; torch
  tensors are stored as numpy arrays and turned back into (read-only, CPU) tensors by
  from_shareable, once per worker process (a cache keyed by the ObjectRef).
"""
import collections
import contextlib
import copy
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import sys
import sysconfig
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from public.core.errors import ATMLError
from public.core.interrupts import named_interrupt

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# Never shipped to a cluster as part of the working_dir (gitignore-style patterns; Ray also
# honours the project's .gitignore). '/data' is the project's data folder, not public/data/.
WORKING_DIR_EXCLUDES = [
    '.git', '.venv', 'venv', '.ci-venv', '.pytest_cache', '__pycache__', '*.pyc',
    'multi-result', 'multi-result-archive-*', 'temp', '.atml-cache', 'ttdata', '/data',
    '*.onnx', '*.pth', '*.pt', '*.npy', '*.npz', '*.zip', '*.tar.gz', 'predictions.csv',
]

# AF_UNIX socket paths are limited to 107 bytes on Linux; Ray puts its sockets at
# <temp>/session_<date>_<time>_<us>_<pid>/sockets/<name>: about 70 bytes after <temp>.
_SOCKET_PATH_MAX = 107
_SOCKET_SUFFIX = 70

_POLL_S = 0.2            # ray.wait slice, so that Ctrl+C is handled promptly

# A private instance is for this machine only: every Ray server (GCS, raylet, object
# manager, core workers of the driver and the workers, runtime-env agent) binds this.
_LOOPBACK = '127.0.0.1'
# RAY_gcs_rpc_server_reconnect_timeout_s of a private instance's processes: when its GCS
# is gone (the driver was killed: the GCS and the raylet die with it), the agents the
# raylet started give up reporting that to the GCS after this long and exit, instead of
# Ray's default 60 s. Nothing else of a private instance outlives its GCS either.
_GCS_GONE_S = 3
# How long an attached cluster's address may refuse connections before RayExecutor gives up.
_REACH_S = 5.0
# A private instance's session folder holds this file (the driver's pid and start time)
# until shutdown(): a session whose file names a dead driver was killed without cleanup.
_DRIVER_MARK = 'atml_driver.json'
# The /tmp fallback folder (see _ray_temp_dir) holds this file (its creator's pid and start).
_OWNER_MARK = 'atml_owner.json'
_FALLBACK_PREFIX = 'ray-'


class RayUnreachableError(ATMLError, ConnectionError):
    """No Ray cluster answers at the address RayExecutor was told to attach to (the
    RAY_ADDRESS setting or environment variable); the message names it and what to check."""


@dataclass
class Job:
    key: str             # unique among pending jobs, e.g. 'AFNet@0.0025' or 'c1-f2'
    fn: Callable         # module-level fn(payload, data) -> result
    payload: Any         # small picklable spec


@dataclass
class Outcome:
    job: Job
    ok: bool             # False: fn raised, or its worker process died twice
    result: Any = None   # fn's return value when ok
    error: str = ''      # why not ok
    node: str = ''       # 'local' (serial) or the first 8 hex chars of the Ray node id
    attempts: int = 1


def describe_exception(exc, frames=3):
    """'Type: message' plus the last `frames` frames of its traceback (this module's own
    frames left out)."""
    lines = [f"{type(exc).__name__}: {exc}"]
    tb = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename != __file__]
    tb = tb[-frames:]
    if tb:
        lines.append('traceback (last lines):')
        lines += [line.rstrip('\n') for line in traceback.format_list(tb)]
    return '\n'.join(lines)


class _Executor:
    """The queue, cancel, pending and context-manager parts both executors share."""

    capacity = 1

    def __init__(self):
        self._pending = {}                     # key -> Job, submission order
        self._queue = collections.deque()      # submitted, not started

    def submit(self, job):
        if job.key in self._pending:
            raise ValueError(f"a job with key {job.key!r} is already pending")
        self._pending[job.key] = job
        self._queue.append(job)

    def pending(self):
        """Jobs submitted and not yet returned by wait() (queued or running)."""
        return list(self._pending.values())

    def cancel(self, job):
        """Drop a queued job; returns True if it was pending."""
        key = getattr(job, 'key', job)
        if key not in self._pending:
            return False
        del self._pending[key]
        self._queue = collections.deque(j for j in self._queue if j.key != key)
        return True

    def _returned(self, outcome):
        self._pending.pop(outcome.job.key, None)
        return outcome

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
        return False


class SerialExecutor(_Executor):
    """In-process, one job at a time, in submission order; never imports Ray."""

    def __init__(self, data):
        super().__init__()
        self.data = data

    def wait(self, timeout=None):
        """Run the oldest queued job now and return [its Outcome] ([] if none is queued)."""
        if not self._queue:
            return []
        job = self._queue.popleft()
        try:
            outcome = Outcome(job, ok=True, result=job.fn(job.payload, self.data), node='local')
        except Exception as exc:         # KeyboardInterrupt propagates
            outcome = Outcome(job, ok=False, error=describe_exception(exc), node='local')
        return [self._returned(outcome)]

    def shutdown(self):
        self._queue.clear()
        self._pending.clear()


# ----------------------------------------------------------------------------- data sharing

class SharedTensor:
    """A torch tensor stored as a numpy array (zero-copy in Ray's object store)."""
    __slots__ = ('array',)

    def __init__(self, array):
        self.array = array

    def __reduce__(self):
        return SharedTensor, (self.array,)


def _map(obj, convert):
    """obj with convert applied to the leaves of its dataclasses, dicts, lists and tuples."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        new = copy.copy(obj)
        for f in dataclasses.fields(obj):
            object.__setattr__(new, f.name, _map(getattr(obj, f.name), convert))
        return new
    if isinstance(obj, dict):
        items = {k: _map(v, convert) for k, v in obj.items()}
        return items if type(obj) is dict else _rebuild(obj, items)
    if isinstance(obj, (list, tuple)):
        items = [_map(v, convert) for v in obj]
        if hasattr(obj, '_fields'):                 # namedtuple
            return type(obj)(*items)
        return _rebuild(obj, items)
    return convert(obj)


def _rebuild(obj, items):
    try:
        return type(obj)(items)
    except TypeError:
        return dict(items) if isinstance(obj, dict) else list(items)


def to_shareable(obj):
    """Torch tensors inside obj (dataclasses, dicts, lists, tuples) -> SharedTensor(numpy),
    so that Ray stores them once, zero-copy, instead of pickling a copy."""
    def convert(value):
        if isinstance(value, torch.Tensor):
            try:
                return SharedTensor(value.detach().cpu().numpy())
            except (TypeError, RuntimeError):  # e.g. bfloat16: no numpy dtype, pickled as is
                return value
        return value
    return _map(obj, convert)


def from_shareable(obj):
    """The inverse of to_shareable: SharedTensor -> torch.from_numpy (CPU, shares memory
    with the object store: treat it as read-only)."""
    def convert(value):
        if isinstance(value, SharedTensor):
            with warnings.catch_warnings():   # read-only buffer: torch warns once
                warnings.simplefilter('ignore', UserWarning)
                return torch.from_numpy(value.array)
        return value
    return _map(obj, convert)


# ----------------------------------------------------------------------------- the Ray task

_DATA_CACHE = {}         # per worker process: ObjectRef hex -> from_shareable(data)
_THREADS = [None]        # torch thread count already set in this worker process


def _worker_data(boxed_ref):
    import ray               # optional: only a parallel search (WORKERS > 1) needs Ray
    ref = boxed_ref[0]                        # boxed, so Ray passes the ref, not the value
    key = ref.hex()
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = from_shareable(ray.get(ref))
    return _DATA_CACHE[key]


def _set_threads(num_threads):
    if num_threads is None or _THREADS[0] == num_threads:
        return
    torch.set_num_threads(num_threads)
    _THREADS[0] = num_threads


def ray_task(fn, payload, boxed_ref, num_threads):
    """Body of every Ray task: (ok, node, finished_at, result or error text)."""
    import ray               # optional: only a parallel search (WORKERS > 1) needs Ray
    node = ray.get_runtime_context().get_node_id()[:8]
    try:
        _set_threads(num_threads)
        result = fn(payload, _worker_data(boxed_ref))
        return True, node, time.time(), result
    except Exception as exc:
        return False, node, time.time(), describe_exception(exc)


# ----------------------------------------------------------------------------- RayExecutor

def _system_failures():
    from ray import exceptions as rex      # optional: only a parallel search needs Ray
    return (rex.WorkerCrashedError, rex.NodeDiedError, rex.LocalRayletDiedError,
            rex.OutOfMemoryError)


def _one_line(text, limit=300):
    text = ' '.join(str(text).split())
    return text if len(text) <= limit else text[:limit] + '...'


def _inside(path, root):
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:
        return False


def _driver_pythonpath():
    """The driver's sys.path entries outside the Python installation (the project, the
    test folder, ...), then this checkout and any inherited PYTHONPATH."""
    install = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    install |= {os.path.realpath(p) for p in sysconfig.get_paths().values()}
    paths = [os.path.abspath(p or os.curdir) for p in sys.path]
    keep = [p for p in paths if os.path.isdir(p)
            and not any(_inside(os.path.realpath(p), root) for root in install)]
    old = [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(keep + [str(PROJECT_ROOT)] + old))


@contextlib.contextmanager
def _environ(set_vars, drop=()):
    """Temporarily change os.environ (the environment Ray's processes are started with)."""
    saved = {name: os.environ.get(name) for name in [*set_vars, *drop]}
    try:
        for name in drop:
            os.environ.pop(name, None)
        os.environ.update(set_vars)
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _cpu_count():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class RayExecutor(_Executor):
    """Jobs as Ray tasks (num_cpus=1 each), at most `capacity` at a time.

    address: '' = attach to $RAY_ADDRESS if set, else start a private local Ray instance;
             'local' = always a private instance (an inherited RAY_ADDRESS is ignored);
             'auto' or 'host:port' = attach to a running cluster, shipping the project
             folder (working_dir, default: this checkout) to its workers. An attached
             cluster is only disconnected from at shutdown(), never stopped. Where nothing
             accepts a connection at that address: RayUnreachableError within _REACH_S s.
    workers: 'auto' = the CPUs Ray sees (cluster_resources()['CPU']), or an int.
    temp_dir: the private instance's files go to <temp_dir>/ray. Unix socket paths are
             limited to 107 bytes, so when that path is too long a short directory under
             /tmp is used instead (removed again at shutdown).
    num_threads: torch.set_num_threads in each worker before fn runs (None: leave it).
    """

    def __init__(self, data, workers='auto', address='', temp_dir='temp', num_threads=1,
                 working_dir=None, log=print):
        super().__init__()
        if not (workers == 'auto' or (isinstance(workers, int) and not isinstance(workers, bool)
                                      and workers >= 1)):
            raise ValueError(f"workers must be 'auto' or an int >= 1, not {workers!r}")
        try:
            import ray               # optional: only a parallel search (WORKERS > 1) needs Ray
        except ImportError as exc:
            raise ImportError(f"RayExecutor needs Ray ({exc}); install it (requirements.txt: "
                              f"ray==2.52.1), or use SerialExecutor") from exc
        if ray.is_initialized():
            raise RuntimeError("RayExecutor: Ray is already initialized in this process; "
                               "call ray.shutdown() first (one executor at a time)")
        self.num_threads = num_threads
        self.log = log
        self._running = {}                    # ObjectRef -> (Job, attempts)
        self._refs = {}                       # key -> ObjectRef of a running job
        self._owned_temp = None
        self._driver_mark = None
        self._progress_queue = None
        self.ray_temp_dir = ''
        address = address or ''
        source = 'RAY_ADDRESS'
        if address == '' and os.environ.get('RAY_ADDRESS'):
            address = os.environ['RAY_ADDRESS']
            source = 'the environment variable RAY_ADDRESS'
        self.address = '' if address == 'local' else address
        started = time.time()
        with _named_interrupts():
            if self.address:
                self._attach(self.address, working_dir, source)
            else:
                self._start_private(workers, temp_dir)
        self.start_s = time.time() - started
        cpus = int(ray.cluster_resources().get('CPU', 0))
        if cpus < 1:
            self.shutdown()
            raise RuntimeError(f"Ray at {self.address or 'the private instance'} has no CPUs")
        self.capacity = cpus if workers == 'auto' else workers
        self._task = ray.remote(num_cpus=1, max_retries=0, retry_exceptions=False)(ray_task)
        with _named_interrupts():
            self._data_ref = ray.put(to_shareable(data))
        where = (f"cluster {self.address}" if self.address
                 else f"private local instance in {self.ray_temp_dir}")
        nodes = sum(1 for n in ray.nodes() if n.get('Alive'))
        self.log(f"Ray: {where}, {nodes} node(s), {cpus} CPU(s); {self.capacity} job(s) at "
                 f"a time ({self.start_s:.1f} s to start)")

    @property
    def data_ref(self):
        return self._data_ref

    def progress_queue(self):
        """A ray.util.queue.Queue the workers put their progress events in (its handle
        travels in the job payload) and the driver drains while it waits; one per executor,
        made on first use, on no CPU of its own."""
        if self._progress_queue is None:
            from ray.util.queue import Queue   # optional: only a parallel search needs Ray
            with _named_interrupts():
                self._progress_queue = Queue(actor_options={'num_cpus': 0})
        return self._progress_queue

    # ---- start / attach
    def _ray_temp_dir(self, temp_dir):
        path = os.path.join(os.path.abspath(temp_dir), 'ray')
        if len(path.encode()) + _SOCKET_SUFFIX <= _SOCKET_PATH_MAX:
            os.makedirs(path, exist_ok=True)
            return path
        _reap_fallbacks(self.log)
        self._owned_temp = tempfile.mkdtemp(prefix=_FALLBACK_PREFIX, dir='/tmp')
        _write_mark(os.path.join(self._owned_temp, _OWNER_MARK))
        self.log(f"Ray: {path} is too long for Unix socket paths; using {self._owned_temp}")
        return self._owned_temp

    def _start_private(self, workers, temp_dir):
        """A private instance on this machine only: every server binds 127.0.0.1, its
        processes end within seconds of the driver (even a killed one), and what an
        earlier killed run left running in the same temp folder is stopped first."""
        import ray               # optional: only a parallel search (WORKERS > 1) needs Ray
        self.ray_temp_dir = self._ray_temp_dir(temp_dir)
        _reap_leftovers(self.ray_temp_dir, self.log)
        num_cpus = _cpu_count() if workers == 'auto' else workers
        # No dashboard means no metrics agent: without this, each worker logs an error
        # ('Failed to establish connection to the metrics exporter agent') to the terminal.
        # The plain `ray` package has no metrics agent (that needs ray[default]): without
        # these, Ray's C++ side prints 'Failed to establish connection to the metrics
        # exporter agent' into the terminal 30 s into every run. C++ messages of Ray's own
        # processes stay in their log files under <temp_dir>/ray/session_latest/logs.
        # _node_ip_address=127.0.0.1: Ray's C++ servers listen on 127.0.0.1 instead of
        # 0.0.0.0 exactly when their node address is 127.0.0.1, and the runtime-env agent
        # binds the node address. RAY_gcs_rpc_server_reconnect_timeout_s: see _GCS_GONE_S.
        env = {'PYTHONPATH': _driver_pythonpath(), 'RAY_USAGE_STATS_ENABLED': '0',
               'RAY_enable_metrics_collection': '0', 'RAY_BACKEND_LOG_LEVEL': 'fatal',
               'RAY_gcs_rpc_server_reconnect_timeout_s': str(_GCS_GONE_S)}
        with _environ(env, drop=['RAY_ADDRESS']), _quiet(), _kept_signal_handlers():
            ray.init(address='local', num_cpus=num_cpus, include_dashboard=False,
                     logging_level=logging.WARNING, log_to_driver=False,
                     _temp_dir=self.ray_temp_dir, _node_ip_address=_LOOPBACK)
        session = _session_dir()
        if session:
            self._driver_mark = os.path.join(session, _DRIVER_MARK)
            _write_mark(self._driver_mark)

    def _attach(self, address, working_dir, source='RAY_ADDRESS'):
        import ray               # optional: only a parallel search (WORKERS > 1) needs Ray
        _check_reachable(address, source)
        working_dir = str(working_dir or PROJECT_ROOT)
        runtime_env = {'working_dir': working_dir, 'excludes': WORKING_DIR_EXCLUDES}
        try:
            with _quiet(), _kept_signal_handlers():
                ray.init(address=address, runtime_env=runtime_env,
                         logging_level=logging.WARNING, log_to_driver=False)
        except ConnectionError as exc:
            raise RayUnreachableError(
                f"{source}={address}: Ray could not connect ({_one_line(exc)}); "
                f"{_what_to_check(address, source)}") from None

    # ---- jobs
    def submit(self, job):
        """Start the job now if fewer than `capacity` run, else queue it in the driver."""
        super().submit(job)
        with _named_interrupts():
            self._fill()

    def _fill(self):
        while self._queue and len(self._running) < self.capacity:
            self._start(self._queue.popleft(), attempts=1)

    def _start(self, job, attempts):
        ref = self._task.options(name=job.key).remote(job.fn, job.payload, [self._data_ref],
                                                      self.num_threads)
        self._running[ref] = (job, attempts)
        self._refs[job.key] = ref

    def running(self):
        """Jobs started on Ray and not yet returned."""
        return [job for job, _ in self._running.values()]

    def wait(self, timeout=None):
        """Block until at least one running job finishes (or `timeout` seconds pass);
        return the Outcomes of the finished jobs in completion order."""
        with _named_interrupts():
            return self._wait(timeout)

    def _wait(self, timeout):
        import ray               # optional: only a parallel search (WORKERS > 1) needs Ray
        deadline = None if timeout is None else time.time() + timeout
        while True:
            self._fill()
            if not self._running:
                return []
            refs = list(self._running)
            ready, _ = ray.wait(refs, num_returns=1, timeout=_POLL_S)
            if ready:
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                outcomes = [o for o in map(self._collect, ready) if o is not None]
                if outcomes:
                    outcomes.sort(key=lambda pair: pair[0])
                    return [self._returned(o) for _, o in outcomes]
            if deadline is not None and time.time() >= deadline:
                return []

    def _collect(self, ref):
        """(finished_at, Outcome) of a finished task, or None when it was retried."""
        import ray               # optional: only a parallel search (WORKERS > 1) needs Ray
        job, attempts = self._running.pop(ref)
        del self._refs[job.key]
        try:
            ok, node, finished_at, value = ray.get(ref)
        except _system_failures() as exc:
            reason = _one_line(exc)
            if attempts == 1:
                self.log(f"job {job.key}: worker process died ({reason}); retrying once")
                self._start(job, attempts=2)
                return None
            error = f"worker process died twice (retried once): {reason}"
            return time.time(), Outcome(job, ok=False, error=error, attempts=attempts)
        except ray.exceptions.RayError as exc:
            return time.time(), Outcome(job, ok=False, error=_one_line(exc, 2000),
                                        attempts=attempts)
        if ok:
            return finished_at, Outcome(job, ok=True, result=value, node=node,
                                        attempts=attempts)
        return finished_at, Outcome(job, ok=False, error=value, node=node, attempts=attempts)

    def cancel(self, job):
        """Drop a queued job, or force-cancel (kill the worker of) a running one; either
        way wait() will not return it. Returns True if it was pending."""
        key = getattr(job, 'key', job)
        ref = self._refs.pop(key, None)
        if ref is not None:
            del self._running[ref]
            with _named_interrupts():
                self._force_cancel(ref)
        return super().cancel(key)

    @staticmethod
    def _force_cancel(ref):
        import ray               # optional: only a parallel search (WORKERS > 1) needs Ray
        try:
            ray.cancel(ref, force=True)
        except Exception:                     # already finished, or Ray is going down
            pass

    def shutdown(self):
        """Force-cancel running jobs, drop queued ones, then stop the private Ray instance
        (or disconnect from the cluster). Safe to call twice."""
        import ray               # optional: only a parallel search (WORKERS > 1) needs Ray
        for ref in list(self._running):
            self._force_cancel(ref)
        self._running.clear()
        self._refs.clear()
        self._queue.clear()
        self._pending.clear()
        self._progress_queue = None           # its actor goes with the instance
        if ray.is_initialized():
            with _named_interrupts():
                ray.shutdown()
        if self._driver_mark:                 # a clean end: nothing for a later run to reap
            with contextlib.suppress(OSError):
                os.remove(self._driver_mark)
            self._driver_mark = None
        if self._owned_temp:
            shutil.rmtree(self._owned_temp, ignore_errors=True)
            self._owned_temp = None


@contextlib.contextmanager
def _quiet():
    """Hide Ray's start-up FutureWarning about accelerator environment variables, and the
    C++ lines its start-up writes straight to file descriptor 2 (shown if the start fails)."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', category=FutureWarning, module=r'ray\.')
        sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile() as caught:
            os.dup2(caught.fileno(), 2)
            try:
                yield
            except BaseException:
                os.dup2(saved, 2)
                caught.seek(0)
                sys.stderr.write(caught.read().decode(errors='replace'))
                raise
            finally:
                os.dup2(saved, 2)
                os.close(saved)


# ----------------------------------------------------------------------------- signals

@contextlib.contextmanager
def _named_interrupts():
    """Ray's C++ calls (ray.wait, ray.get, ...) run Python's signal handlers themselves,
    swallow the KeyboardInterrupt('SIGTERM') of public.core.interrupts.GracefulInterrupts and
    raise a bare KeyboardInterrupt instead: give it its signal's name back."""
    try:
        yield
    except KeyboardInterrupt as exc:
        named = named_interrupt(exc)
        if named is exc:
            raise
        raise named from None


@contextlib.contextmanager
def _kept_signal_handlers():
    """Put back the SIGINT and SIGTERM handlers ray.init replaces: its Python SIGTERM
    handler (sys.exit, status 1 or 15) and the C++ fatal-signal handler of the driver's core
    worker, which prints '*** SIGTERM received ... PC: @' before it. So a signal ends a
    parallel run exactly like a serial one (GracefulInterrupts: KeyboardInterrupt(name))."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:          # None: not set from Python, cannot be put back
                signal.signal(sig, handler)


# ----------------------------------------------------------------------------- leftovers

def _session_dir():
    """The session folder of the Ray instance this process started, or None."""
    try:
        import ray               # optional: only a parallel search (WORKERS > 1) needs Ray
        return ray._private.worker._global_node.get_session_dir_path()
    except Exception:                         # a private Ray API: best effort
        return None


def _proc_start(pid):
    """The start time (clock ticks after boot) of process pid, or None if it is gone."""
    try:
        text = Path(f'/proc/{pid}/stat').read_text()
    except OSError:
        return None
    fields = text[text.rindex(')') + 2:].split()
    return None if fields[0] in ('Z', 'X') else fields[19]


def _write_mark(path):
    """Record this process (pid and start time) in path."""
    with contextlib.suppress(OSError):
        Path(path).write_text(json.dumps({'pid': os.getpid(), 'start': _proc_start(os.getpid())}))


def _mark_is_dead(path):
    """True if path names a process that no longer runs (False if it runs, or the file
    cannot be read: never reap on a doubt)."""
    try:
        mark = json.loads(Path(path).read_text())
        pid, start = int(mark['pid']), mark['start']
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return start is not None and _proc_start(pid) != start


def _processes_mentioning(paths):
    """{pid: path} of this user's processes whose command line mentions one of paths."""
    found, me, uid = {}, os.getpid(), os.getuid()
    for entry in os.listdir('/proc'):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            if os.stat(f'/proc/{entry}').st_uid != uid:
                continue
            args = Path(f'/proc/{entry}/cmdline').read_bytes().decode(errors='replace')
        except OSError:
            continue
        args = args.replace('\0', ' ')
        for path in paths:
            if path + os.sep in args or args.endswith(path) or path + ' ' in args:
                found[int(entry)] = path
                break
    return found


def _kill_all(pids, wait_s=3.0):
    """SIGKILL pids; wait until they are gone (at most wait_s); the number signalled."""
    starts = {pid: _proc_start(pid) for pid in pids}
    killed = 0
    for pid, start in starts.items():
        if start is None:
            continue
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except OSError:
            pass
    deadline = time.time() + wait_s
    while time.time() < deadline and any(
            start is not None and _proc_start(pid) == start for pid, start in starts.items()):
        time.sleep(0.05)
    return killed


def _reap_leftovers(ray_temp_dir, log):
    """Stop what the private instances of earlier runs in ray_temp_dir left running because
    their driver was killed (SIGKILL, out of memory) before it could stop them: each session
    folder whose driver mark names a dead process; the processes are this user's whose
    command line names that session folder. Logs a note when it stops any."""
    dead = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(ray_temp_dir):
            mark = os.path.join(entry.path, _DRIVER_MARK)
            if entry.name.startswith('session_') and not entry.is_symlink() \
                    and os.path.exists(mark) and _mark_is_dead(mark):
                dead.append(entry.path)
    if not dead:
        return 0
    found = _processes_mentioning(dead)
    killed = _kill_all(found) if found else 0
    for session in dead:
        with contextlib.suppress(OSError):
            os.remove(os.path.join(session, _DRIVER_MARK))
    if killed:
        sessions = sorted({found[pid] for pid in found})
        log(f"Ray: stopped {killed} process(es) that an earlier run's private instance left "
            f"running when its driver was killed ({', '.join(sessions)})")
    return killed


def _reap_fallbacks(log):
    """The /tmp fallback folders (see RayExecutor._ray_temp_dir) of killed runs: their
    leftover processes stopped, the folders removed (a clean shutdown removes its own)."""
    for entry in Path('/tmp').glob(_FALLBACK_PREFIX + '*'):
        mark = entry / _OWNER_MARK
        try:
            if entry.is_symlink() or not mark.exists() or entry.stat().st_uid != os.getuid():
                continue
        except OSError:
            continue
        if _mark_is_dead(mark):
            _reap_leftovers(str(entry), log)
            shutil.rmtree(entry, ignore_errors=True)


# ----------------------------------------------------------------------------- attaching

def _what_to_check(address, source='RAY_ADDRESS'):
    start = ("start one (`ray start --head`)" if address == 'auto' else
             "start a cluster there (`ray start --head` on that machine)")
    private = ("unset the environment variable RAY_ADDRESS (and keep the setting "
               "RAY_ADDRESS='')" if 'environment' in source else "set RAY_ADDRESS=''")
    return (f"{start}, fix the address, or for a private local instance {private}; "
            f"WORKERS=1 runs the search serially without Ray")


def _host_port(address):
    """(host, port) of 'host:port', '[v6]:port' or 'ray://host:port'; None if unparsable."""
    rest = address.split('://', 1)[1] if '://' in address else address
    rest = rest.split('/', 1)[0]
    if rest.startswith('['):
        host, _, port = rest[1:].partition(']:')
    else:
        host, _, port = rest.rpartition(':')
    if not host or not port.isdigit():
        return None
    return host, int(port)


def _check_reachable(address, source='RAY_ADDRESS', within=None):
    """Raise RayUnreachableError unless something accepts a TCP connection at the cluster
    address (retried for `within` seconds, default _REACH_S): ray.init would otherwise wait
    about 150 s, printing C++ warnings. 'auto' is first resolved the way ray.init does."""
    within = _REACH_S if within is None else within
    target = address
    if address == 'auto':
        try:
            from ray._private import services      # optional: only a parallel search needs Ray
            target = services.canonicalize_bootstrap_address('auto')
        except ConnectionError as exc:
            raise RayUnreachableError(f"{source}={address}: no running Ray cluster found on "
                                      f"this machine ({_one_line(exc)}); "
                                      f"{_what_to_check(address, source)}") from None
        except Exception:                     # a private Ray API: leave it to ray.init
            return
        if not target:
            return
    hp = _host_port(target)
    if hp is None:
        return                                # ray.init says what is wrong with it
    started, last = time.monotonic(), None
    while True:
        left = within - (time.monotonic() - started)
        try:
            with socket.create_connection(hp, timeout=max(0.2, min(2.0, left))):
                return
        except OSError as exc:
            last = exc
        if time.monotonic() - started + 0.5 >= within:
            break
        time.sleep(0.5)
    resolved = f" (= {target})" if target != address else ''
    raise RayUnreachableError(
        f"{source}={address}{resolved}: no Ray cluster answers there (nothing accepted a "
        f"connection to {hp[0]}:{hp[1]} within {within:g} s: {last}); "
        f"{_what_to_check(address, source)}")
