"""Helper of tests/test_ray_private.py: a driver that starts a private RayExecutor (2 workers)
in FOLDER/ray, starts two long jobs, prints one line `READY <session folder>` once both
run, then waits for them (the test sends it SIGKILL).

    python tests/ray_private_driver.py FOLDER
"""
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from public.search.executor import Job, RayExecutor, _session_dir  # noqa: E402
from tests import ray_jobs  # noqa: E402


def main(folder):
    with RayExecutor(None, workers=2, address='local', temp_dir=folder, log=print) as ex:
        for i in range(2):
            ex.submit(Job(f'long{i}', ray_jobs.sleep_pid,
                          {'dir': folder, 'name': f'long{i}', 's': 300}))
        deadline = time.time() + 60
        while not all(os.path.exists(os.path.join(folder, f'long{i}.pid')) for i in range(2)):
            if time.time() > deadline:
                print('the jobs did not start within 60 s', flush=True)
                return 1
            ex.wait(timeout=0.1)
        print('READY', _session_dir(), flush=True)
        while ex.pending():
            ex.wait()
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1]))
