import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # oracles
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))  # benchmarks (the published model)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_runtest_logreport(report):
    """GEOMOE_FAILURE_LOG=FILE: append each failure's traceback as it happens, so a run stopped by
    its time limit (a device run) still says what failed and why."""
    path = os.environ.get("GEOMOE_FAILURE_LOG")
    if path and report.failed and not os.environ.get("PYTEST_XDIST_WORKER"):  # once, in the controller
        with open(path, "a") as f:
            f.write(f"===== {report.nodeid} ({report.when}, {report.duration:.1f} s)\n{report.longreprtext}\n\n")
