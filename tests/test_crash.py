"""Crash consistency, proved step by step: for every durable write step of a small search
(stage one and stage two), a run killed with SIGKILL right after that step and then rerun
ends in exactly the state of an uninterrupted run (tests/crash_driver.py does the runs)."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.parametrize('stage', ['stage1', 'stage2'])
def test_a_kill_after_any_write_step_then_a_rerun_equals_an_uninterrupted_run(stage, small_data,
                                                                            tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / 'tests' / 'crash_driver.py'), stage,
                          str(tmp_path), str(small_data.train), str(small_data.test),
                          str(small_data.cache)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report['steps'] >= 10, report           # the search really wrote step by step
    names = ' '.join(report['names'])
    for step in ('row', 'renamed into place', 'write summary.csv' if stage == 'stage1' else 'built'):
        assert step in names
    assert report['mismatches'] == [], json.dumps(report['mismatches'], indent=1)[:3000]
