"""CI builds the CUDA core on every run (nvcc is on the CI machine, no GPU): it must have compiled,
linked and imported, for the architectures asked for, with no register spills."""

import os
import re
import shutil
import subprocess

import pytest
import torch

import geomoe_kernels
from geomoe_kernels import cuda

REQUIRED = os.environ.get("GEOMOE_REQUIRE_CUDA") == "1"


@pytest.mark.skipif(not REQUIRED and cuda._core is None, reason="CUDA core not built here (no nvcc); CI requires it")
def test_cuda_core_built_without_spills():
    assert cuda._core is not None, cuda._status
    archs = os.environ.get("GEOMOE_CUDA_ARCHS", "80;90a")
    assert cuda._core.architectures() == f"{archs};compute_{_newest_ptx_arch(archs)}"
    report = open(os.path.join(os.path.dirname(geomoe_kernels.__file__), "_cuda_build.txt")).read()
    entries = re.findall(r"Compiling entry function '(\w+)'", report)
    assert len(entries) >= 10
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill stores", report)]
    stacks = [int(x) for x in re.findall(r"(\d+) bytes stack frame", report)]
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", report)]
    assert len(spills) == len(entries) == len(regs) and not any(spills) and not any(stacks)
    # the summary line agrees with the report it sums (the PTX target adds no ptxas entries)
    summary = report.splitlines()[1]
    assert f"{len(entries)} kernel builds; max registers {max(regs)};" in summary and "spill stores 0 bytes" in summary


def _sm90_table(report: str):
    """The report's sm_90 table: [(arch, registers, spill stores, static smem, mma, tma, kernel)]."""
    rows = [
        line[2:].split(" | ") for line in report.splitlines() if line.startswith("# sm_90a | ") or line.startswith("# sm_90 | ")
    ]
    return [(a, int(r), int(s), int(m), mma, tma, k) for a, r, s, m, mma, tma, k in rows]


@pytest.mark.skipif(not REQUIRED and cuda._core is None, reason="CUDA core not built here (no nvcc); CI requires it")
def test_sm90_report_says_what_the_hardware_runs():
    """setup.py reads the SASS (cuobjdump -sass) of every sm_90 kernel into the report: mma HGMMA
    (wgmma), HMMA (mma.sync) or -, and tma yes where it issues TMA loads, beside ptxas's registers,
    spills and static shared memory; one row per sm_90 entry ptxas compiled."""
    archs = os.environ.get("GEOMOE_CUDA_ARCHS", "80;90a")
    if not any(a.startswith("90") for a in archs.split(";")):
        pytest.skip("no sm_90 target in this build")
    report = open(os.path.join(os.path.dirname(geomoe_kernels.__file__), "_cuda_build.txt")).read()
    table = _sm90_table(report)
    entries = re.findall(r"Compiling entry function '(\w+)' for '(sm_90a?)'", report)
    assert sorted((k, a) for a, *_, k in table) == sorted(entries)
    assert all(mma in ("HGMMA", "HMMA", "-") and tma in ("yes", "no") for _, _, _, _, mma, tma, _ in table)
    assert not any(mma != "-" for *_, mma, _, k in table if "gating" in k or "permute" in k)  # no MMA there


@pytest.mark.skipif(not REQUIRED and cuda._core is None, reason="CUDA core not built here (no nvcc); CI requires it")
def test_shipped_sm90_gemm_kernels_run_hgmma_without_spills():
    """Every grouped-GEMM kernel the sm_90a build ships (forward, dgrad, weight gradient; what the
    launchers run on a 9.0 device: the wg:: kernels) issues HGMMA (wgmma) and spills nothing, and
    loads by TMA (the forward and dgrad W, the weight gradient G and A taken as stored); the
    mma.sync kernels compile to a trap there (no MMA, never launched on sm_90a), so that no HMMA
    GEMM ships for sm_90."""
    if "90a" not in os.environ.get("GEOMOE_CUDA_ARCHS", "80;90a").split(";"):
        pytest.skip("no sm_90a target in this build")
    report = open(os.path.join(os.path.dirname(geomoe_kernels.__file__), "_cuda_build.txt")).read()
    gemm = [row for row in _sm90_table(report) if "grouped_gemm" in row[-1]]
    wgmma = [row for row in gemm if re.search(r"2wg(10gmm_kernel|12wgrad_kernel)I", row[-1])]  # geomoe::(anon)::wg::
    assert len(wgmma) == 24, [row[-1] for row in wgmma]  # 2 dtypes x (4 forward + 4 dgrad + 4 wgrad)
    for arch, regs, spills, smem, mma, tma, kernel in gemm:
        assert spills == 0, kernel
        if kernel in {row[-1] for row in wgmma}:
            assert mma == "HGMMA", kernel
            assert tma == "yes", kernel
        else:
            assert mma == "-", f"{kernel}: an mma.sync GEMM ships for sm_90a ({mma})"


def _newest_ptx_arch(archs: str) -> str:
    return str(max(int(re.sub(r"[af]$", "", a)) for a in archs.split(";") if a))


@pytest.mark.skipif(not REQUIRED and cuda._core is None, reason="CUDA core not built here (no nvcc); CI requires it")
def test_cuda_core_embeds_the_ptx_of_its_newest_architecture():
    """A GPU newer than every built architecture JIT-compiles the embedded PTX instead of failing
    with "no kernel image": the PTX is the newest arch's without its arch-specific suffix (90a's
    would load on sm_90a alone)."""
    assert _newest_ptx_arch("80;90a") == "90" and _newest_ptx_arch("80;86;100a") == "100"
    arch = _newest_ptx_arch(os.environ.get("GEOMOE_CUDA_ARCHS", "80;90a"))
    report = open(os.path.join(os.path.dirname(geomoe_kernels.__file__), "_cuda_build.txt")).read()
    assert report.splitlines()[1].endswith(f"; ptx compute_{arch}")
    newer = (int(arch[:-1]) + 1, 0)  # a device past every cubin: runs through the PTX
    assert cuda.runs_on(newer, cuda._core.architectures())
    triton = pytest.importorskip("triton")  # its wheel carries cuobjdump where the toolkit has none
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    tool = tool if os.path.exists(tool) else shutil.which("cuobjdump")
    if tool is None:
        pytest.skip("no cuobjdump to list the embedded PTX")
    listed = subprocess.run([tool, "--list-ptx", cuda._core.__file__], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert re.search(rf"\.sm_{arch}\.ptx", listed.stdout), listed.stdout[-2000:]


def _cubin_probe_bounds(tool, library):
    """{arch: the grouped GEMM's probe kernel's max threads} in `library`'s cubins (cuobjdump -elf:
    EIATTR_MAX_THREADS of .nv.info.<probe>) and embedded PTX ("compute_NN": its .maxntid)."""
    found, arch, probe, max_threads = {}, None, False, False
    with subprocess.Popen([tool, "-elf", library], stdout=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:
            text = line.strip()
            if line.startswith("arch = "):
                arch = text.split("=")[1].strip()
            elif line.startswith(".nv.info."):
                probe, max_threads = "cubin_probe" in line, False
            elif probe and text.startswith("Attribute:"):
                max_threads = text.endswith("EIATTR_MAX_THREADS")
            elif probe and max_threads and text.startswith("Value:"):
                found[arch], probe = int(text.split()[1], 16), False
    ptx = subprocess.run([tool, "-ptx", library], capture_output=True, text=True, timeout=300).stdout
    for section in re.split(r"\narch = ", ptx)[1:]:
        entry = re.search(r"\.entry \w*cubin_probe\w*\(\s*\)\s*\.maxntid (\d+), 1, 1", section)
        if entry:
            found["compute_" + section.split()[0].removeprefix("sm_")] = int(entry.group(1))
    return found


@pytest.mark.skipif(not REQUIRED and cuda._core is None, reason="CUDA core not built here (no nvcc); CI requires it")
def test_cubin_probe_tells_the_sm90a_code_from_every_other():
    """The launchers run the wgmma kernels exactly where the probe kernel's maxThreadsPerBlock on
    the device is 64 (grouped_gemm.cu; core.grouped_mm_kernels_for, tested in
    test_cuda_emulated.py): its __launch_bounds__ in the shipped code must be 64 in the sm_90a cubin
    (where the mma.sync kernels compile to a trap) and 32 in every other cubin and in the embedded
    PTX (where the wgmma kernels do), read back from the built core."""
    triton = pytest.importorskip("triton")  # its wheel carries cuobjdump where the toolkit has none
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    tool = tool if os.path.exists(tool) else shutil.which("cuobjdump")
    if tool is None:
        pytest.skip("no cuobjdump to read the cubins")
    bounds = _cubin_probe_bounds(tool, cuda._core.__file__)
    archs = os.environ.get("GEOMOE_CUDA_ARCHS", "80;90a").split(";")
    want = {f"sm_{a}": 64 if a == "90a" else 32 for a in archs if a}
    want[f"compute_{_newest_ptx_arch(';'.join(archs))}"] = 32
    assert bounds == want


# what the CUDA runtime says when a launch finds no usable GPU (the core prefixes the binding's name)
NO_GPU_LAUNCH = re.compile(
    r"geomoe CUDA core: \w+: (CUDA driver version is insufficient for CUDA runtime version"
    r"|no CUDA-capable device is detected|CUDA driver is a stub library"
    r"|forward compatibility was attempted on non supported HW)"
)


class _LaunchProbe:
    """Stands in for the CUDA core: each call goes to the real binding (so pybind checks every
    argument's type and count) and the launch's 'no GPU here' error is swallowed."""

    def __init__(self, core):
        self.core, self.called = core, []

    def __getattr__(self, name):
        fn = getattr(self.core, name)

        def call(*args, **kwargs):
            self.called.append(name)
            try:
                return fn(*args, **kwargs)
            except RuntimeError as exc:  # the launch itself: fine, there is no GPU here
                if not NO_GPU_LAUNCH.fullmatch(str(exc)) or not str(exc).startswith(f"geomoe CUDA core: {name}: "):
                    raise  # any other error (an argument check of the binding's own, say) fails the test

        return call


@pytest.mark.skipif(not REQUIRED and cuda._core is None, reason="CUDA core not built here (no nvcc); CI requires it")
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels run for real in tests/test_gpu.py")
def test_every_wrapper_call_matches_its_binding(monkeypatch):
    """geomoe_kernels/cuda.py against csrc/bindings.cpp, on CPU tensors: a wrong argument count or
    type would otherwise surface only on a GPU."""
    from geomoe_kernels.reference.permute import route

    probe = _LaunchProbe(cuda._core)
    monkeypatch.setattr(cuda, "_core_for", lambda t: probe)  # CPU tensors would go to the emulated core
    monkeypatch.setattr(cuda, "_stream", lambda t: 0)
    T, k, E, K, H = 6, 2, 4, 16, 8
    bf = dict(dtype=torch.bfloat16)
    logits = torch.randn(T, E)
    _, ids, _, _ = cuda.topk_gating(logits, torch.zeros(E), k, "sigmoid", True)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    cuda.topk_gating_backward(torch.randn(T, k), torch.randn(E), logits, ids, "sigmoid", True)
    cuda.route(ids, E)
    r2f, f2r, off = route(ids, E)
    x = torch.randn(T, K, **bf)
    rows = cuda.permute(x, r2f, k, torch.rand(T, k))
    cuda.unpermute(torch.randn(T * k, K, **bf), f2r, k, torch.rand(T, k), x)
    cuda.unpermute_weight_grad(x, torch.randn(T * k, K, **bf), f2r, k)
    nbr = torch.randint(-1, T, (T, 9))
    cuda.masked_depthwise_conv(x, nbr, torch.randn(K, 9, **bf), torch.randn(K, **bf))
    cuda.masked_depthwise_conv_backward(x, x, nbr, torch.randn(K, 9, **bf))
    w1, b1, w2, b2 = torch.randn(E, K, H, **bf), torch.randn(E, H, **bf), torch.randn(E, H, K, **bf), torch.randn(E, K, **bf)
    pre = torch.randn(T * k, H, **bf)
    cuda.grouped_mm(x, w1, off, b1, "gelu", r2f, k)
    cuda.grouped_mm_backward(torch.randn(T * k, H, **bf), x, w1, off, pre, "gelu", r2f, k)
    cuda.expert_mlp(x, w1, b1, w2, b2, off, "silu", r2f, f2r, k)
    cuda.expert_mlp_backward(torch.randn(T * k, K, **bf), x, w1, w2, off, pre, "gelu", r2f, k)
    assert rows is not None
    launched = set(probe.called)
    assert {
        "topk_gating",
        "topk_gating_backward",
        "route_histogram",
        "route_scatter",
        "permute",
        "unpermute",
        "unpermute_weight_grad",
        "masked_depthwise_conv",
        "masked_depthwise_conv_wgrad",
        "grouped_mm",
        "grouped_mm_wgrad",
    } <= launched, launched


@pytest.mark.parametrize(
    "capability,archs,runs",
    [
        ((9, 0), "80;90a", True),
        ((8, 0), "80;90a", True),
        ((8, 9), "80;90a", True),
        ((8, 6), "90a", False),
        ((10, 0), "80;90a", False),
        ((12, 0), "80;90a;compute_90", True),
        ((7, 5), "80;compute_80", False),
        ((9, 0), "90", True),
        ((10, 0), "90a", False),
    ],
)
def test_architecture_check(capability, archs, runs):
    """Which devices a build has code for: auto skips the CUDA core on the others (no 'no kernel image')."""
    from geomoe_kernels.cuda import runs_on

    assert runs_on(capability, archs) is runs


def test_launchers_run_with_the_tensors_device_current(monkeypatch):
    """A tensor on another GPU than the current one: each launcher call runs inside that device's
    context (the core launches on the current device), and only around the call."""
    import contextlib

    entered = []

    @contextlib.contextmanager
    def device(index):
        entered.append(("enter", index))
        yield
        entered.append(("exit", index))

    class FakeCore:
        def permute(self, **kwargs):
            entered.append(("launch", kwargs["n"]))
            return "launched"

    monkeypatch.setattr(torch.cuda, "device", device)
    on_device = cuda._OnDevice(FakeCore(), 1)
    assert on_device.permute(n=7) == "launched"
    assert entered == [("enter", 1), ("launch", 7), ("exit", 1)]
