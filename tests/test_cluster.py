"""Multi-node: a 2-node Ray cluster on this machine (Ray's own cluster_utils.Cluster, head +
one worker node, 1 CPU each); a small stage one attached to it through RAY_ADDRESS runs
trials on both nodes and records the same results as the serial search."""
import os

import pytest

from public.search.dispatch import make_executor
from public.core.interrupts import NoInterrupts
from public.results.table import ResultsTable, STAGE1_COLUMNS, TIMING_COLUMNS
from public.search.stage_one import run_stage_one

ray = pytest.importorskip('ray')


@pytest.fixture
def cluster(two_node_cluster):
    return two_node_cluster


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
