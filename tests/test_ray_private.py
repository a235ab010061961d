"""A private local Ray instance is private (issue 15), tested with real processes and real
signals:

1. every TCP socket its processes listen on is bound to a loopback address;
2. a driver killed with SIGKILL leaves no process of its instance behind, and the next
   start stops what an earlier killed run did leave running;
3. SIGTERM and Ctrl+C (SIGINT to the process group) end a parallel `train_multi.py` run
   exactly like a serial one: 'Interrupted (<signal>)', status 130, nothing else printed;
4. an unreachable RAY_ADDRESS fails within seconds with a clear error (status 2).

Every test here starts Ray (or needs it); 'ray' is in their names for `-k ray`. The driver
of 2. is tests/ray_private_driver.py."""
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import descendants, proc_stat

ray = pytest.importorskip('ray')

ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / 'tests' / 'ray_private_driver.py'


# ----------------------------------------------------------------------------- /proc helpers

def _cmdline(pid):
    try:
        return Path(f'/proc/{pid}/cmdline').read_bytes().replace(b'\0', b' ').decode(
            errors='replace').strip()
    except OSError:
        return ''


def mentioning(text):
    """{pid: start time} of the processes whose command line contains text."""
    found = {}
    for p in os.listdir('/proc'):
        if p.isdigit() and int(p) != os.getpid() and text in _cmdline(p):
            stat = proc_stat(p)
            if stat:
                found[int(p)] = stat[2]
    return found


def still_running(procs):
    """The processes of {pid: start time} that still run (zombies and reused pids aside)."""
    alive = []
    for pid, start in procs.items():
        stat = proc_stat(pid)
        if stat and stat[2] == start and stat[0] not in ('Z', 'X'):
            alive.append(pid)
    return alive


def wait_gone(procs, seconds):
    deadline = time.time() + seconds
    while still_running(procs) and time.time() < deadline:
        time.sleep(0.1)
    return still_running(procs)


def _address(hex_address):
    """'0100007F:1F90' (/proc/net/tcp) or its tcp6 form -> (ip_address, port)."""
    host, port = hex_address.split(':')
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        ip = ipaddress.IPv4Address(raw[::-1])
    else:                                      # four 32-bit words, each in host order
        ip = ipaddress.IPv6Address(b''.join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
    return ip, int(port, 16)


def listening_sockets(pids):
    """[(pid, command, ip, port)] of the TCP sockets in LISTEN state that pids hold."""
    owner = {}
    for pid in pids:
        try:
            fds = os.listdir(f'/proc/{pid}/fd')
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f'/proc/{pid}/fd/{fd}')
            except OSError:
                continue
            if link.startswith('socket:['):
                owner[link[8:-1]] = pid
    found, tables = set(), set()
    for pid in pids:
        for name in ('tcp', 'tcp6'):
            try:
                path = f'/proc/{pid}/net/{name}'
                key = (os.stat(f'/proc/{pid}/ns/net').st_ino, name)
                if key in tables:
                    continue
                lines = Path(path).read_text().splitlines()[1:]
                tables.add(key)
            except OSError:
                continue
            for line in lines:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == '0A' and inode in owner:          # 0A: TCP_LISTEN
                    ip, port = _address(local)
                    pid_ = owner[inode]
                    found.add((pid_, _cmdline(pid_), str(ip), port))
    return sorted(found)


def _loopback(ip):
    ip = ipaddress.ip_address(ip)
    mapped = getattr(ip, 'ipv4_mapped', None)
    return (mapped or ip).is_loopback


def assert_loopback_only(pids):
    sockets = listening_sockets(pids)
    assert sockets, f"no listening socket found among {pids}"
    outside = [s for s in sockets if not _loopback(s[2])]
    assert outside == [], 'listening beyond loopback:\n' + '\n'.join(map(str, outside))
    return sockets


def test_ray_proc_net_parsing_matches_known_addresses():
    assert _address('0100007F:1F90') == (ipaddress.ip_address('127.0.0.1'), 8080)
    assert _address('00000000:0016') == (ipaddress.ip_address('0.0.0.0'), 22)
    v6 = _address('0000000000000000FFFF00000100007F:AD5D')[0]
    assert v6.ipv4_mapped == ipaddress.ip_address('127.0.0.1') and _loopback(str(v6))
    assert _loopback('::1') and not _loopback('::') and not _loopback('0.0.0.0')


# ----------------------------------------------------------------------------- the driver

class Driver:
    """tests/ray_private_driver.py in its own session, with a short folder under /tmp."""

    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix='rp-', dir='/tmp')  # short: Unix socket paths
        self.log = open(Path(self.folder) / 'driver.log', 'w')
        env = dict(os.environ, PYTHONUNBUFFERED='1')
        env.pop('RAY_ADDRESS', None)
        self.proc = subprocess.Popen([sys.executable, str(HELPER), self.folder], cwd=str(ROOT),
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.time() + 90
        while True:
            ready = [line for line in self.output().splitlines() if line.startswith('READY ')]
            if ready:
                self.session = ready[0].split(' ', 1)[1].strip()
                break
            assert self.proc.poll() is None and time.time() < deadline, self.output()
            time.sleep(0.1)
        assert self.session.startswith(self.folder + '/ray/session_'), self.session
        self.worker_pids = [int(Path(self.folder, f'long{i}.pid').read_text()) for i in range(2)]

    def output(self):
        return Path(self.folder, 'driver.log').read_text()

    def processes(self):
        """{pid: start} of the driver, everything below it, and whatever names its session."""
        procs = descendants(self.proc.pid)
        procs.update(mentioning(self.session))
        stat = proc_stat(self.proc.pid)
        if stat:
            procs[self.proc.pid] = stat[2]
        return procs

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        for pid in still_running(mentioning(self.session)):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope='module')
def driver():
    """A live driver of a private instance for this module's tests (started again if an
    earlier test killed it)."""
    live = []

    def get():
        if not live or live[-1].proc.poll() is not None:
            live.append(Driver())
        return live[-1]
    yield get
    for d in live:
        d.close()


def test_ray_private_instance_listens_on_loopback_only(driver):
    d = driver()
    procs = d.processes()
    names = ' '.join(_cmdline(p) for p in procs)
    for part in ('gcs_server', 'raylet', 'runtime_env/agent', 'ray::'):
        assert part in names, f"{part} is not among the instance's processes: {names}"
    sockets = assert_loopback_only(list(procs))
    holders = ' '.join(s[1] for s in sockets)
    for part in ('gcs_server', 'raylet', 'runtime_env/agent', 'ray::', str(HELPER)):
        assert part in holders, f"no socket of {part}: {sockets}"


def test_ray_killed_driver_leaves_nothing_behind_and_the_next_start_reaps_leftovers(
        driver, tmp_path):
    from public.search.executor import Job, RayExecutor
    from tests import ray_jobs
    d = driver()
    procs = d.processes()
    assert set(d.worker_pids) <= set(procs) and len(procs) >= 6, procs
    # Stands in for a Ray process stuck after its driver died (as the dashboard and
    # runtime-env agents were for 60 s): not Ray's, so only the next start can stop it.
    stuck = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)',
                              f'--session-dir={d.session}'], start_new_session=True)
    try:
        killed_at = time.time()
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(timeout=10)
        left = wait_gone(procs, 10)
        assert left == [], (f"left running {time.time() - killed_at:.1f} s after SIGKILL: "
                            + '; '.join(f"{p} {_cmdline(p)[:120]}" for p in left))
        assert still_running(mentioning(d.session)) == [stuck.pid]
        logs = []
        with RayExecutor({'x': [1.0, 2.0]}, workers=1, address='local', temp_dir=d.folder,
                         log=logs.append) as ex:
            assert stuck.wait(timeout=5) == -signal.SIGKILL
            ex.submit(Job('after', ray_jobs.scaled_sum, 2))
            [outcome] = ex.wait(timeout=60)
        assert outcome.ok and outcome.result == 6.0, outcome
        notes = [line for line in logs if 'left running when its driver was killed' in line]
        assert len(notes) == 1 and d.session in notes[0] and 'stopped 1 process' in notes[0], logs
        assert mentioning(d.session) == {}
    finally:
        if stuck.poll() is None:
            stuck.kill()


def _dead_mark():
    """A driver mark naming a process that ran and is gone."""
    proc = subprocess.Popen([sys.executable, '-c', 'import sys; sys.stdin.read()'],
                            stdin=subprocess.PIPE)
    start = proc_stat(proc.pid)[2]
    proc.stdin.close()
    proc.wait()
    return json.dumps({'pid': proc.pid, 'start': start})


def _live_mark():
    return json.dumps({'pid': os.getpid(), 'start': proc_stat(os.getpid())[2]})


def _stand_in(session):
    """A process whose command line names session, as Ray's processes' do."""
    return subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)',
                             f'--session-dir={session}'], start_new_session=True)


def test_ray_reaping_stops_only_what_dead_drivers_left_and_removes_their_tmp_folders():
    """What RayExecutor's start runs first: in its temp folder (_reap_leftovers) and, when
    it falls back to a /tmp folder, among the fallback folders of earlier runs."""
    from public.search.executor import _reap_fallbacks, _reap_leftovers
    own = tempfile.mkdtemp(prefix='rp-', dir='/tmp')           # a TEMP_DIR/ray folder
    dead_fb = tempfile.mkdtemp(prefix='ray-', dir='/tmp')      # a killed run's fallback
    live_fb = tempfile.mkdtemp(prefix='ray-', dir='/tmp')      # a running run's fallback
    sessions = {name: os.path.join(root, 'session_2026-01-01_00-00-00_000000_1')
                for name, root in (('dead', own), ('live', own), ('dead_fb', dead_fb),
                                   ('live_fb', live_fb))}
    sessions['live'] += '2'                                    # another session, same folder
    procs = {}
    try:
        for name, session in sessions.items():
            os.makedirs(session)
            Path(session, 'atml_driver.json').write_text(
                _live_mark() if name == 'live' else _dead_mark())
            procs[name] = _stand_in(session)
        Path(dead_fb, 'atml_owner.json').write_text(_dead_mark())
        Path(live_fb, 'atml_owner.json').write_text(_live_mark())
        time.sleep(0.3)
        logs = []
        assert _reap_leftovers(own, logs.append) == 1
        assert procs['dead'].wait(timeout=5) == -signal.SIGKILL
        assert len(logs) == 1 and sessions['dead'] in logs[0] and 'stopped 1 process' in logs[0]
        assert not Path(sessions['dead'], 'atml_driver.json').exists()   # looked at once
        _reap_fallbacks(logs.append)
        assert procs['dead_fb'].wait(timeout=5) == -signal.SIGKILL
        assert not os.path.exists(dead_fb) and os.path.exists(live_fb)
        assert any(sessions['dead_fb'] in line for line in logs[1:]), logs   # (and any other
                                                # killed run's /tmp folder on this machine)
        for name in ('live', 'live_fb'):          # a running driver's processes are left alone
            assert procs[name].poll() is None, name
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        for folder in (own, dead_fb, live_fb):
            shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------- attaching

def test_ray_auto_address_attaches_to_a_running_cluster_and_a_stale_one_fails_fast(
        monkeypatch):
    """'auto' (here: the address a head node records for this machine) keeps working; once
    that cluster is gone, the same 'auto' fails at once instead of waiting for ray.init."""
    from ray.cluster_utils import Cluster

    from public.core.errors import ATMLError
    from public.search.executor import Job, RayExecutor, RayUnreachableError, _check_reachable
    from tests import ray_jobs
    temp = tempfile.mkdtemp(prefix='ca-', dir='/tmp')
    os.makedirs(os.path.join(temp, 'ray'))
    monkeypatch.setenv('RAY_TMPDIR', temp)      # where the head records its address
    monkeypatch.delenv('RAY_ADDRESS', raising=False)
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={'num_cpus': 1, 'temp_dir': temp})
        logs = []
        with RayExecutor({'x': [1.0]}, address='auto', log=logs.append) as ex:
            ex.submit(Job('a', ray_jobs.scaled_sum, 3))
            [outcome] = ex.wait(timeout=60)
        assert outcome.ok and outcome.result == 3.0, outcome
        assert logs[0].startswith('Ray: cluster auto, 1 node(s)'), logs
        address = cluster.address
        ray.shutdown()
        cluster.shutdown()
        cluster = None
        # A head killed without cleanup leaves its address recorded: ray.init('auto') would
        # wait about 150 s for it.
        Path(temp, 'ray', 'ray_current_cluster').write_text(address)
        started = time.time()
        with pytest.raises(RayUnreachableError) as info:
            _check_reachable('auto', within=1)
        assert time.time() - started < 5
        assert isinstance(info.value, ATMLError)
        assert str(info.value).startswith(f'RAY_ADDRESS=auto (= {address}): no Ray cluster '
                                          f'answers there'), info.value
        assert 'ray start --head' in str(info.value), info.value
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_unreachable_address_setting_names_the_setting_and_the_fix():
    from public.search.executor import RayUnreachableError, _check_reachable
    started = time.time()
    with pytest.raises(RayUnreachableError) as info:
        _check_reachable('127.0.0.1:1', within=1)
    assert time.time() - started < 3
    message = str(info.value)
    assert message.startswith('RAY_ADDRESS=127.0.0.1:1: no Ray cluster answers there '
                              '(nothing accepted a connection to 127.0.0.1:1 within 1 s'), message
    assert "set RAY_ADDRESS=''" in message and 'WORKERS=1' in message, message


# ----------------------------------------------------------------------------- train_multi

@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp('demo-cache')


def _train_multi(tmp_path, cache, env_extra=None, **settings):
    """Start train_multi.py on the demo data, every output in scratch folders; (proc, log)."""
    temp = tempfile.mkdtemp(prefix='rpt-', dir='/tmp')      # short: Unix socket paths
    values = dict(NUM_EPOCHS=30, LR_MIN=0.0015, LR_MAX=0.002, STEP=0.0005, MODELS=('AFNet',),
                  WORKERS=2, DEVICE='cpu', LATENCY_RUNS=1, MODEL_SAVE_PATH=str(tmp_path / 'mr'),
                  AVOID_FILE_PATH=str(tmp_path / 'avoid.txt'), TEMP_DIR=temp,
                  CACHE_DIR=str(cache), FINAL_RESULT_DIR=str(tmp_path / 'final'))
    values.update(settings)
    env = dict(os.environ, PYTHONUNBUFFERED='1', **(env_extra or {}))
    if not (env_extra or {}).get('RAY_ADDRESS'):
        env.pop('RAY_ADDRESS', None)
    env.pop('CUDA_VISIBLE_DEVICES', None)
    log = tmp_path / 'run.log'
    with open(log, 'w') as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / 'train_multi.py'),
                                 *[f"{k}={v!r}" for k, v in values.items()]],
                                cwd=str(ROOT), stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    proc.temp = temp
    return proc, log


@pytest.mark.parametrize('sig, target', [(signal.SIGTERM, 'driver'), (signal.SIGINT, 'group')])
def test_ray_parallel_run_ends_on_a_signal_exactly_like_a_serial_one(sig, target, tmp_path,
                                                                     cache_dir):
    """SIGTERM to the driver (kill PID, a scheduler), SIGINT to its process group (Ctrl+C)."""
    proc, log = _train_multi(tmp_path, cache_dir)
    try:
        deadline, training = time.time() + 90, {}
        while not training:                    # both trials run in Ray workers
            assert proc.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.2)
            procs = descendants(proc.pid)
            training = {p: s for p, s in procs.items() if _cmdline(p).startswith('ray::AFNet@')}
        time.sleep(0.5)
        procs = descendants(proc.pid)
        assert_loopback_only([proc.pid, *procs])
        sent = time.time()
        if target == 'group':
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        rc = proc.wait(timeout=30)
        took = time.time() - sent
        out = log.read_text()
        name = signal.Signals(sig).name
        assert rc == 130, out
        assert f"Interrupted ({name}) after " in out, out
        for bad in ('*** SIGTERM received', '*** SIGINT received', 'PC: @', 'Traceback',
                    'KeyboardInterrupt', 'WARNING', 'Warning:', '(raylet)', 'rpc_client',
                    'core_worker', 'gcs_client'):
            assert bad not in out, out
        lines = out.rstrip('\n').splitlines()
        assert lines[-1].startswith(f'Interrupted ({name}) after '), out
        after = lines[lines.index('AFNet: searching 2 learning rate(s)') + 1:-1]
        assert all(line == '' or line.startswith('AFNet') for line in after), out
        assert took < 15, f"{took:.1f} s from the signal to the end"
        assert wait_gone(procs, 10) == [], 'left running: ' + '; '.join(
            _cmdline(p)[:100] for p in still_running(procs))
        assert not (tmp_path / 'mr' / 'results.csv').exists() or 'failed' not in \
            (tmp_path / 'mr' / 'results.csv').read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(proc.temp, ignore_errors=True)


def test_ray_unreachable_address_fails_fast_with_a_clear_error(tmp_path, cache_dir):
    started = time.time()
    proc, log = _train_multi(tmp_path, cache_dir, env_extra={'RAY_ADDRESS': '127.0.0.1:1'})
    try:
        rc = proc.wait(timeout=40)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(proc.temp, ignore_errors=True)
    took = time.time() - started
    out = log.read_text()
    assert rc == 2, out
    error = [line for line in out.splitlines() if line.startswith('error: ')]
    assert len(error) == 1, out
    assert error[0].startswith('error: the environment variable RAY_ADDRESS=127.0.0.1:1: no Ray '
                               'cluster answers there'), error
    assert 'ray start --head' in error[0] and 'unset the environment variable RAY_ADDRESS' \
        in error[0] and 'WORKERS=1' in error[0], error
    assert 'Traceback' not in out and 'rpc_client' not in out and 'gcs_client' not in out, out
    assert took < 25, f"{took:.1f} s"
