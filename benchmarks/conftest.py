import os
import platform
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
    # `--benchmark-disable` (CI): run every benchmark once on tiny shapes, as a smoke test
    if config.getoption("benchmark_disable", default=False) and not os.environ.get("GEOMOE_BENCH"):
        os.environ["GEOMOE_BENCH"] = "smoke"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def pytest_benchmark_update_machine_info(config, machine_info):
    from benchmarks.common import mode

    machine_info["geomoe"] = {
        "mode": mode(),
        "card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "commit": _commit(),
        "threads": torch.get_num_threads(),
    }


def _triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None
