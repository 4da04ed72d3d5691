import os

import pytest
import torch

from tests.helpers import backends_here, kernel_backends_here

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on CI's two cores: one thread each (and in the processes the tests
    # start), since two threads per worker oversubscribe the cores and OpenMP's waits then cost more
    # than the second thread gains
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_backend_choices():
    """Each test chooses backends under its own environment (tests set TRITON_INTERPRET,
    GEOMOE_SELF_CHECK ... with monkeypatch, and the choices are cached per process): set up before,
    torn down after monkeypatch has put the environment back."""
    from geomoe_kernels import backend

    backend.forget()
    yield
    backend.forget()


def pytest_generate_tests(metafunc):
    """`backend`: every backend that runs here; `kernel_backend`: those other than the reference.
    With `dtype` beside either: each backend in each of its dtypes. A test that parametrises them
    itself (tests/test_gpu.py) keeps its own."""
    explicit = {
        n.strip()
        for m in metafunc.definition.iter_markers("parametrize")
        for n in (m.args[0].split(",") if isinstance(m.args[0], str) else m.args[0])
    }
    for name, found in (("backend", backends_here), ("kernel_backend", kernel_backends_here)):
        if name not in metafunc.fixturenames or name in explicit:
            continue
        if "dtype" in metafunc.fixturenames and "dtype" not in explicit:
            pairs = [(b, dt) for b in found() for dt in b.dtypes]
            metafunc.parametrize((name, "dtype"), pairs, ids=[f"{b}-{str(dt).replace('torch.', '')}" for b, dt in pairs])
        else:
            params = found()
            metafunc.parametrize(name, params, ids=[str(b) for b in params])


def pytest_collection_modifyitems(config, items):
    """Under TRITON_INTERPRET=1 (tests/test_triton_interpreter.py's process) or GEOMOE_CUDA_EMULATE
    (tests/test_cuda_emulated.py's) only the tests that take a backend run, and in the latter that
    file's own: the rest have run in the main process."""
    emulating = os.environ.get("GEOMOE_CUDA_EMULATE", "0") != "0"
    if os.environ.get("TRITON_INTERPRET") != "1" and not emulating:
        return

    def kept(item) -> bool:
        takes_backend = {"backend", "kernel_backend"} & set(getattr(item, "fixturenames", ()))
        return bool(takes_backend) or (emulating and item.path.name == "test_cuda_emulated.py")

    keep = [i for i in items if kept(i)]
    config.hook.pytest_deselected(items=[i for i in items if i not in keep])
    items[:] = keep


def pytest_runtest_logreport(report):
    """GEOMOE_FAILURE_LOG=FILE: append each failure's traceback as it happens, so a run stopped by
    its time limit still says what failed and why."""
    path = os.environ.get("GEOMOE_FAILURE_LOG")
    if path and report.failed and not os.environ.get("PYTEST_XDIST_WORKER"):  # once, in the controller
        with open(path, "a") as f:
            f.write(f"===== {report.nodeid} ({report.when}, {report.duration:.1f} s)\n{report.longreprtext}\n\n")
