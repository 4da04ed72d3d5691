import os
import platform
import subprocess
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
    # `--benchmark-disable` (CI): run every benchmark once on tiny shapes, as a smoke test
    if config.getoption("benchmark_disable", default=False) and not os.environ.get("GEOMOE_BENCH"):
        os.environ["GEOMOE_BENCH"] = "smoke"


def _priority(item) -> int:
    """0: the headline figures (the MoE layer at the reference size, uniform routing; the front end
    at mask 0.75; the train step; the grouped GEMM and the permutation at the reference size; our
    layer at the largest size); 1: the other kernels at the reference size; 2: the rest at the reference size (skewed routing, other masks); 3: the sweep.
    A run cut short by its time budget keeps the figures that matter most."""
    from benchmarks.common import reference_tokens, token_sweep

    params = getattr(getattr(item, "callspec", None), "params", {})
    group = item.originalname if hasattr(item, "originalname") else item.name
    tokens = params.get("tokens", reference_tokens())
    uniform = params.get("routing", "uniform") == "uniform"
    if (
        (group == "test_moe_layer_fwdbwd" and tokens == reference_tokens() and uniform)
        or (group == "test_front_end_fwdbwd" and params.get("mask_ratio") == 0.75)
        or group == "test_pretrain_step"
        or (group in ("test_grouped_gemm_up_projection", "test_permute") and tokens == reference_tokens())
    ):
        return 0
    if group == "test_moe_layer_fwdbwd":
        largest = tokens == token_sweep()[-1] and uniform and params.get("impl") in ("geomoe", "geomoe_graph")
        return 0 if largest else (2 if tokens == reference_tokens() else 3)
    if group in ("test_front_end_fwdbwd", "test_cblock_fwdbwd"):
        return 2
    return 1 if tokens == reference_tokens() else 3


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=_priority)  # stable: file order inside each priority


def pytest_runtest_setup(item):
    """GEOMOE_BENCH_DEADLINE (a Unix time, set by `benchmarks.run --budget`): skip what would start
    after it, so that pytest still ends normally and writes the results it has."""
    deadline = os.environ.get("GEOMOE_BENCH_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip("the benchmark run's time budget is spent")


def pytest_terminal_summary(terminalreporter, config):
    """Say what a smoke run's numbers are, under pytest-benchmark's table and the summary line."""
    from benchmarks.common import mode

    if mode() == "smoke":
        timed = "not timed (--benchmark-disable)" if config.getoption("benchmark_disable", default=False) else "timed one round"
        terminalreporter.write_line(
            f"benchmark items, smoke mode: each ran once on tiny shapes to check that it works, {timed}; "
            "these are benchmark items, not tests, and any times above are not measurements"
        )


def _commit() -> str:
    if os.environ.get("GEOMOE_COMMIT"):  # a copy of the tree without .git (a remote machine) says which commit it is
        return os.environ["GEOMOE_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def pytest_benchmark_update_machine_info(config, machine_info):
    from benchmarks.common import mode

    machine_info["geomoe"] = {
        "mode": mode(),
        "card": torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
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
