"""Multi-node: a 2-node Ray cluster on this machine (Ray's own cluster_utils.Cluster, head +
one worker node, 1 CPU each); a small stage one attached to it through RAY_ADDRESS runs
trials on both nodes and records the same results as the serial search."""
import os
import shutil
import tempfile

import pytest

from public.dispatch import make_executor
from public.interrupts import NoInterrupts
from public.results import STAGE1_COLUMNS, TIMING_COLUMNS, ResultsTable
from public.search import run_stage_one

ray = pytest.importorskip('ray')


@pytest.fixture
def cluster():
    from ray.cluster_utils import Cluster
    temp = tempfile.mkdtemp(prefix='cl-', dir='/tmp')        # short enough for Unix sockets
    c = Cluster(initialize_head=True, head_node_args={'num_cpus': 1, 'temp_dir': temp})
    try:
        # Both "nodes" share one session folder on this machine: each needs its own folder
        # for the shipped project (see tests/test_executor.py's cluster test).
        c.add_node(num_cpus=1, runtime_env_dir_name='runtime_resources_node2')
        c.wait_for_nodes()
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def _run(settings, prepared, executor=None):
    # A model of public/model.py: workers import it from the project shipped to the cluster
    # (runtime_env working_dir), not from this checkout.
    from public.model import OptimizedAFNet
    run_stage_one(settings, prepared, [OptimizedAFNet], NoInterrupts(), log=lambda m: None,
                  progress=False, executor=executor)
    rows = ResultsTable(os.path.join(settings.MODEL_SAVE_PATH, 'results.csv'), STAGE1_COLUMNS).rows()
    return rows


def test_stage_one_on_a_two_node_cluster_equals_the_serial_search(cluster, prepared,
                                                                  make_settings, tmp_path):
    grid = dict(LR_MIN=0.002, LR_MAX=0.005, STEP=0.001)
    serial = _run(make_settings(**grid), prepared)
    settings = make_settings(WORKERS='auto', RAY_ADDRESS=cluster.address,
                             MODEL_SAVE_PATH=str(tmp_path / 'on-cluster'), **grid)
    lines = []
    with make_executor(settings, prepared, lines.append) as executor:
        assert executor.capacity == 2
        rows = _run(settings, prepared, executor)
    assert 'Ray: cluster' in lines[0] and '2 node(s)' in lines[0]
    nodes = {r['node'] for r in rows}
    assert len(nodes) == 2, f"trials ran on {nodes}: {lines} {[r['error'] for r in rows]}"

    def comparable(rs):
        return sorted(({k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rs),
                      key=lambda r: (r['model'], float(r['lr'])))
    assert comparable(rows) == comparable(serial)
