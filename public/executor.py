"""Where the jobs of a search run: in-process one at a time, or in parallel on Ray.

The driver (the search) keeps all bookkeeping; an executor only runs jobs and reports back.
Both executors share one interface and know nothing about ATML's stages:

    from public.executor import Job, RayExecutor, SerialExecutor

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
import importlib.util
import logging
import os
import shutil
import sys
import sysconfig
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Never shipped to a cluster as part of the working_dir (gitignore-style patterns; Ray also
# honours the project's .gitignore).
WORKING_DIR_EXCLUDES = [
    '.git', '.venv', 'venv', '.ci-venv', '.pytest_cache', '__pycache__', '*.pyc',
    'multi-result', 'multi-result-archive-*', 'temp', '.atml-cache', 'ttdata', 'data',
    '*.onnx', '*.pth', '*.pt', '*.npy', '*.npz', '*.zip', '*.tar.gz', 'predictions.csv',
]

# AF_UNIX socket paths are limited to 107 bytes on Linux; Ray puts its sockets at
# <temp>/session_<date>_<time>_<us>_<pid>/sockets/<name>: about 70 bytes after <temp>.
_SOCKET_PATH_MAX = 107
_SOCKET_SUFFIX = 70

_POLL_S = 0.2            # ray.wait slice, so that Ctrl+C is handled promptly


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
    torch = sys.modules.get('torch')          # no tensor can exist without torch imported
    if torch is None:
        return obj

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
            import torch
            with warnings.catch_warnings():   # read-only buffer: torch warns once
                warnings.simplefilter('ignore', UserWarning)
                return torch.from_numpy(value.array)
        return value
    return _map(obj, convert)


# ----------------------------------------------------------------------------- the Ray task

_DATA_CACHE = {}         # per worker process: ObjectRef hex -> from_shareable(data)
_THREADS = [None]        # torch thread count already set in this worker process


def _worker_data(boxed_ref):
    import ray
    ref = boxed_ref[0]                        # boxed, so Ray passes the ref, not the value
    key = ref.hex()
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = from_shareable(ray.get(ref))
    return _DATA_CACHE[key]


def _set_threads(num_threads):
    if num_threads is None or _THREADS[0] == num_threads:
        return
    if 'torch' in sys.modules or importlib.util.find_spec('torch') is not None:
        import torch
        torch.set_num_threads(num_threads)
    _THREADS[0] = num_threads


def run_job(fn, payload, boxed_ref, num_threads):
    """Body of every Ray task: (ok, node, finished_at, result or error text)."""
    import ray
    node = ray.get_runtime_context().get_node_id()[:8]
    try:
        _set_threads(num_threads)
        result = fn(payload, _worker_data(boxed_ref))
        return True, node, time.time(), result
    except Exception as exc:
        return False, node, time.time(), describe_exception(exc)


# ----------------------------------------------------------------------------- RayExecutor

def _system_failures():
    from ray import exceptions as rex
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
             cluster is only disconnected from at shutdown(), never stopped.
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
            import ray
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
        self.ray_temp_dir = ''
        address = address or ''
        if address == '' and os.environ.get('RAY_ADDRESS'):
            address = os.environ['RAY_ADDRESS']
        self.address = '' if address == 'local' else address
        started = time.time()
        if self.address:
            self._attach(self.address, working_dir)
        else:
            self._start_private(workers, temp_dir)
        self.start_s = time.time() - started
        cpus = int(ray.cluster_resources().get('CPU', 0))
        if cpus < 1:
            self.shutdown()
            raise RuntimeError(f"Ray at {self.address or 'the private instance'} has no CPUs")
        self.capacity = cpus if workers == 'auto' else workers
        self._task = ray.remote(num_cpus=1, max_retries=0, retry_exceptions=False)(run_job)
        self._data_ref = ray.put(to_shareable(data))
        where = (f"cluster {self.address}" if self.address
                 else f"private local instance in {self.ray_temp_dir}")
        nodes = sum(1 for n in ray.nodes() if n.get('Alive'))
        self.log(f"Ray: {where}, {nodes} node(s), {cpus} CPU(s); {self.capacity} job(s) at "
                 f"a time ({self.start_s:.1f} s to start)")

    @property
    def data_ref(self):
        return self._data_ref

    # ---- start / attach
    def _ray_temp_dir(self, temp_dir):
        path = os.path.join(os.path.abspath(temp_dir), 'ray')
        if len(path.encode()) + _SOCKET_SUFFIX <= _SOCKET_PATH_MAX:
            os.makedirs(path, exist_ok=True)
            return path
        self._owned_temp = tempfile.mkdtemp(prefix='ray-', dir='/tmp')
        self.log(f"Ray: {path} is too long for Unix socket paths; using {self._owned_temp}")
        return self._owned_temp

    def _start_private(self, workers, temp_dir):
        import ray
        self.ray_temp_dir = self._ray_temp_dir(temp_dir)
        num_cpus = _cpu_count() if workers == 'auto' else workers
        # No dashboard means no metrics agent: without this, each worker logs an error
        # ('Failed to establish connection to the metrics exporter agent') to the terminal.
        # The plain `ray` package has no metrics agent (that needs ray[default]): without
        # these, Ray's C++ side prints 'Failed to establish connection to the metrics
        # exporter agent' into the terminal 30 s into every run. C++ messages of Ray's own
        # processes stay in their log files under <temp_dir>/ray/session_latest/logs.
        env = {'PYTHONPATH': _driver_pythonpath(), 'RAY_USAGE_STATS_ENABLED': '0',
               'RAY_enable_metrics_collection': '0', 'RAY_BACKEND_LOG_LEVEL': 'fatal'}
        with _environ(env, drop=['RAY_ADDRESS']), _quiet():
            ray.init(address='local', num_cpus=num_cpus, include_dashboard=False,
                     logging_level=logging.WARNING, log_to_driver=False,
                     _temp_dir=self.ray_temp_dir)

    def _attach(self, address, working_dir):
        import ray
        working_dir = str(working_dir or PROJECT_ROOT)
        runtime_env = {'working_dir': working_dir, 'excludes': WORKING_DIR_EXCLUDES}
        with _quiet():
            ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING,
                     log_to_driver=False)

    # ---- jobs
    def submit(self, job):
        """Start the job now if fewer than `capacity` run, else queue it in the driver."""
        super().submit(job)
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
        import ray
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
        import ray
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
            self._force_cancel(ref)
        return super().cancel(key)

    @staticmethod
    def _force_cancel(ref):
        import ray
        try:
            ray.cancel(ref, force=True)
        except Exception:                     # already finished, or Ray is going down
            pass

    def shutdown(self):
        """Force-cancel running jobs, drop queued ones, then stop the private Ray instance
        (or disconnect from the cluster). Safe to call twice."""
        import ray
        for ref in list(self._running):
            self._force_cancel(ref)
        self._running.clear()
        self._refs.clear()
        self._queue.clear()
        self._pending.clear()
        if ray.is_initialized():
            ray.shutdown()
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
