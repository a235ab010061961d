"""Toy job functions for tests/test_executor.py: fn(payload, data) at module level, so that
Ray workers import them by reference (as `tests.ray_jobs`). Only the standard library at
import time: a SerialExecutor run must not pull in Ray (or torch)."""
import os
import signal
import sys
import time
from pathlib import Path


def scaled_sum(payload, data):
    """payload * sum(data['x'])."""
    return payload * float(sum(data['x']))


def describe_data(payload, data):
    """What a worker sees of data: its identity, types, shape, writability, threads."""
    torch = sys.modules.get('torch')
    return dict(pid=os.getpid(), data_id=id(data), x_type=type(data['x']).__name__,
                x_writeable=bool(data['x'].flags.writeable),
                t_type=type(data['t']).__name__, t_shape=tuple(data['t'].shape),
                t_sum=float(data['t'].sum()), label=data['label'],
                threads=torch.get_num_threads() if torch else None)


def fail(payload, data):
    raise ValueError(f"bad payload {payload}")


def record(payload, data):
    """Write <dir>/<name>.start (start time), sleep, write .end; payload: (dir, name, s)."""
    folder, name, seconds = payload
    Path(folder, f"{name}.start").write_text(f"{time.time()}")
    time.sleep(seconds)
    Path(folder, f"{name}.end").write_text(f"{time.time()}")
    return name


def die_first(payload, data):
    """Kill its own worker process on the first `times` attempts (counted by marker files
    in payload['dir']); then return the attempt number."""
    folder = Path(payload['dir'])
    attempt = len(list(folder.glob(f"{payload['name']}.attempt-*"))) + 1
    (folder / f"{payload['name']}.attempt-{attempt}").write_text(str(os.getpid()))
    if attempt <= payload['times']:
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(30)
    return attempt


def sleep_pid(payload, data):
    """Write <dir>/<name>.pid, then sleep payload['s'] seconds; returns the Ray node id
    and where this module was imported from."""
    Path(payload['dir'], f"{payload['name']}.pid").write_text(str(os.getpid()))
    time.sleep(payload['s'])
    import ray
    return ray.get_runtime_context().get_node_id()[:8], os.path.abspath(__file__)
