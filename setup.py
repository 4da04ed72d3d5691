"""Install geomoe_kernels (the library) and geomoe (the application, from python/), and build the
CUDA core in csrc/ into geomoe_kernels/_cuda_core, and the same kernels with the host C++ compiler
into geomoe_kernels/_cuda_emulated, which runs them on the CPU (csrc/emulation/).

The CUDA core needs only nvcc and the CUDA runtime (linked statically), never torch's headers, so
it builds on a CPU-only machine and one binary works with any torch. Architectures come from
GEOMOE_CUDA_ARCHS (default "80;90a"). The compiler's resource report (registers, stack, spills per
kernel) is written to geomoe_kernels/_cuda_build.txt. Where nvcc is missing or the build fails, the
install says so in one line and goes on without it, unless GEOMOE_REQUIRE_CUDA=1 (CI) makes it an
error.

The emulated core needs a C++17 compiler and the CUDA toolkit's headers (for the host versions of
__half and __nv_bfloat16; no GPU, driver or nvcc run). GEOMOE_EMULATION_ASAN=1 (set by the Makefile)
also builds it with AddressSanitizer into geomoe_kernels/_cuda_emulated_asan, which the tests run
with libasan preloaded. GEOMOE_REQUIRE_CUDA=1 requires these builds too.

GEOMOE_EXTENSIONS (none, or comma-separated core, emulated, asan) builds only those: the Makefile builds the
CUDA core alone for `make pretrain` and the emulated builds only for `make test`, which needs them
(unset: the CUDA core and the emulated core, and the ASan build under GEOMOE_EMULATION_ASAN=1)."""

import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
REQUIRE = os.environ.get("GEOMOE_REQUIRE_CUDA") == "1"
ASAN = os.environ.get("GEOMOE_EMULATION_ASAN") == "1"
_KINDS = ("core", "emulated", "asan")
_DEFAULT_KINDS = "core,emulated" + (",asan" if ASAN else "")
_ASKED = os.environ.get("GEOMOE_EXTENSIONS", "").strip() or _DEFAULT_KINDS
WANTED = [] if _ASKED == "none" else [k.strip() for k in _ASKED.split(",") if k.strip()]
if any(k not in _KINDS for k in WANTED):
    raise SystemExit(f"GEOMOE_EXTENSIONS expected none or a comma-separated subset of {', '.join(_KINDS)}, got {_ASKED!r}")
EMULATED = "geomoe_kernels._cuda_emulated"


def _load(path):
    spec = importlib.util.spec_from_file_location("geomoe_emulation_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


emulation = _load(os.path.join(HERE, "csrc", "emulation", "build.py"))  # the emulated build's recipe


def _nvcc():
    """nvcc inside a CUDA toolkit (bin/nvcc beside include/cuda_runtime.h); a wrapper on PATH is
    followed to the toolkit it names only through CUDA_HOME or the usual install places."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [os.path.join(home, "bin", "nvcc")] if home else []
    candidates += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"] + sorted(glob.glob("/usr/local/cuda-*/bin/nvcc"))[::-1]
    for c in candidates:
        c = os.path.realpath(c) if c else ""
        if c and os.path.exists(os.path.join(os.path.dirname(os.path.dirname(c)), "include", "cuda_runtime.h")):
            return c
    return None


def _cuobjdump(nvcc):
    """cuobjdump beside nvcc, else on PATH, else the one Triton's wheel carries (CUDA 13's minimal
    toolkits ship none); None when there is none."""
    beside = os.path.join(os.path.dirname(nvcc), "cuobjdump")
    if os.path.exists(beside):
        return beside
    if shutil.which("cuobjdump"):
        return shutil.which("cuobjdump")
    if os.environ.get("GEOMOE_CUOBJDUMP"):
        return os.environ["GEOMOE_CUOBJDUMP"]
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        tool = os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(tool):
            return tool
    # pip builds in an isolated environment where triton does not import: the wheel installed in
    # the environment whose interpreter runs this build
    env = os.path.dirname(os.path.dirname(sys.executable))
    found = sorted(
        glob.glob(os.path.join(env, "lib", "python3*", "site-packages", "triton", "backends", "nvidia", "bin", "cuobjdump"))
    )
    return found[0] if found else None


def _sass_features(tool, obj):
    """{(arch, kernel): (mma, tma)} from the object's SASS: mma HGMMA (wgmma), HMMA (mma.sync) or -,
    tma yes where a tensor-memory-access instruction (UTMALDG / UTMASTG) is issued."""
    proc = subprocess.run([tool, "-sass", obj], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"cuobjdump -sass failed on {os.path.basename(obj)}: {proc.stderr[-2000:]}")
    found, arch, name = {}, None, None
    for line in proc.stdout.splitlines():
        m = re.match(r"\s*arch = (sm_\w+)", line)
        if m:
            arch, name = m.group(1), None
            continue
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            name = m.group(1)
            found[(arch, name)] = set()
            continue
        if name is not None:
            ops = found[(arch, name)]
            for op in ("HGMMA", "HMMA", "UTMALDG", "UTMASTG"):
                if op in line and re.search(rf"\b{op}\b", line):
                    ops.add(op)
    return {
        key: ("HGMMA" if "HGMMA" in ops else "HMMA" if "HMMA" in ops else "-", "yes" if ops & {"UTMALDG", "UTMASTG"} else "no")
        for key, ops in found.items()
    }


def _ptxas_entries(text):
    """[(arch, kernel, registers, spill stores, static shared bytes)] from ptxas -v's report."""
    entries = []
    for m in re.finditer(r"Compiling entry function '(\w+)' for '(sm_\w+)'\n(.*?)(?=\nptxas info\s+: Compile time)", text, re.S):
        body = m.group(3)
        regs = re.search(r"Used (\d+) registers", body)
        spills = re.search(r"(\d+) bytes spill stores", body)
        smem = re.search(r"(\d+) bytes smem", body)
        entries.append(
            (
                m.group(2),
                m.group(1),
                int(regs.group(1)) if regs else 0,
                int(spills.group(1)) if spills else 0,
                int(smem.group(1)) if smem else 0,
            )
        )
    return entries


def _sm90_table(entries, features):
    """The sm_90 kernels' table written into the report: what the hardware will run."""
    rows = ["# sm_90 kernels | registers | spill stores | static smem | mma | tma | kernel"]
    for arch, name, regs, spills, smem in entries:
        if arch.startswith("sm_90"):
            mma, tma = features.get((arch, name), ("?", "?"))
            rows.append(f"# {arch} | {regs} | {spills} | {smem} | {mma} | {tma} | {name}")
    return "\n".join(rows) + "\n"


def _say(msg: str) -> None:
    print(f"geomoe_kernels: {msg}", file=sys.stderr)


class BuildCudaCore(build_ext):
    def build_extensions(self):
        kept = []
        for ext in self.extensions:
            emulated = ext.name.startswith(EMULATED)
            try:
                self._prepare_emulated(ext) if emulated else self._compile_cuda(ext)
                kept.append(ext)
            except Exception as exc:  # no nvcc, no CUDA headers, or a compile error
                if REQUIRE:
                    raise
                what = "the emulated CUDA core" if emulated else "the CUDA core"
                _say(f"{what} was not built ({exc}); the torch and Triton backends work without it")
        self.extensions = kept
        super().build_extensions()

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # the host compiler failed on the emulated core
            if REQUIRE or not ext.name.startswith(EMULATED):
                raise
            _say(f"{ext.name} was not built ({exc}); the torch and Triton backends work without it")

    def _prepare_emulated(self, ext):
        """The kernel sources, unchanged but for dynamic shared memory, compiled as C++ against the
        emulated runtime (csrc/emulation/ comes first on the include path)."""
        headers = emulation.cuda_headers(_nvcc())
        if headers is None:
            raise RuntimeError("the CUDA headers were not found (set CUDA_HOME)")
        out = os.path.join(self.build_temp, ext.name.rsplit(".", 1)[1])
        os.makedirs(out, exist_ok=True)
        sources = ["csrc/bindings.cpp"]  # setuptools takes relative paths only
        for src in sorted(glob.glob("csrc/*.cu")):
            dst = os.path.relpath(os.path.join(out, os.path.basename(src) + ".cpp"))
            with open(dst, "w") as f:
                f.write(emulation.host_source(src))
            sources.append(dst)
        ext.sources = sources
        ext.include_dirs[:0] = emulation.include_dirs(headers)

    def _compile_cuda(self, ext):
        nvcc = _nvcc()
        if nvcc is None:
            raise RuntimeError("nvcc not found (set CUDA_HOME)")
        cuda = os.path.dirname(os.path.dirname(nvcc))
        archs = [a for a in os.environ.get("GEOMOE_CUDA_ARCHS", "80;90a").split(";") if a]
        # machine code for each arch, and the PTX of the newest one so that a GPU newer than all of
        # them compiles that at load time instead of failing with "no kernel image". Arch-specific
        # targets (90a) lose their suffix: their PTX would load on that arch alone.
        ptx = max((re.sub(r"[af]$", "", a) for a in archs), key=int, default=None)
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode += [f"-gencode=arch=compute_{ptx},code=compute_{ptx}"] if ptx else []
        # the launchers choose the sm_90a kernels (wgmma, TMA) on a 9.0 device only where they were built
        defines = ["-DGEOMOE_SM90A_BUILT=1"] if "90a" in archs else []
        os.makedirs(self.build_temp, exist_ok=True)
        objects, report, features = [], [], {}
        tool = _cuobjdump(nvcc) if any(a.startswith("90") for a in archs) else None
        if tool is None and any(a.startswith("90") for a in archs):
            if REQUIRE:
                raise RuntimeError("cuobjdump not found (the sm_90 report reads the SASS): set GEOMOE_CUOBJDUMP or CUDA_HOME")
            _say("cuobjdump not found: the build report has no sm_90 SASS table (set GEOMOE_CUOBJDUMP)")
        for src in sorted(glob.glob(os.path.join(HERE, "csrc", "*.cu"))):
            obj = os.path.join(self.build_temp, os.path.basename(src) + ".o")
            cmd = [
                nvcc,
                "-O3",
                "-std=c++17",
                "-Xcompiler",
                "-fPIC",
                "-Xptxas",
                "-v",
                "-lineinfo",
                *defines,
                *gencode,
                "-c",
                src,
                "-o",
                obj,
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"nvcc failed on {os.path.basename(src)}:\n{proc.stderr[-4000:]}")
            report.append(proc.stderr)
            objects.append(obj)
            if tool is not None:
                features.update(_sass_features(tool, obj))
        text = "".join(report)
        spills = [int(x) for x in re.findall(r"(\d+) bytes spill stores", text)]
        stacks = [int(x) for x in re.findall(r"(\d+) bytes stack frame", text)]
        regs = [int(x) for x in re.findall(r"Used (\d+) registers", text)]
        summary = (
            f"archs {';'.join(archs)}; {len(regs)} kernel builds; max registers {max(regs, default=0)}; "
            f"max stack {max(stacks, default=0)} bytes; spill stores {sum(spills)} bytes; ptx compute_{ptx}"
        )
        with open(os.path.join(HERE, "geomoe_kernels", "_cuda_build.txt"), "w") as f:
            f.write(f"# nvcc {nvcc}\n# {summary}\n{text}" + (_sm90_table(_ptxas_entries(text), features) if tool else ""))
        _say(f"built the CUDA core with {nvcc}: {summary}")
        ext.extra_objects = objects
        ext.include_dirs += [os.path.join(cuda, "include")]
        ext.library_dirs += [os.path.join(cuda, "lib64"), os.path.join(cuda, "lib")]
        ext.libraries += ["cudart_static", "dl", "rt", "pthread"]
        # what the core says it runs on (cuda.runs_on): the PTX lets it load on newer devices too
        built = archs + ([f"compute_{ptx}"] if ptx else [])
        ext.define_macros += [("GEOMOE_CUDA_ARCHS", f'"{";".join(built)}"')]


def _emulated_extension(name, pybind11_include, flags=()):
    return Extension(
        name,
        sources=["csrc/bindings.cpp"],
        include_dirs=[pybind11_include],
        extra_compile_args=[*emulation.FLAGS, *flags],
        language="c++",
        extra_link_args=[f for f in flags if f.startswith("-fsanitize")],
        define_macros=[("GEOMOE_MODULE", name.rsplit(".", 1)[1]), ("GEOMOE_CUDA_ARCHS", '"emulated"')],
    )


def _extensions():
    try:
        import pybind11
    except ImportError:
        _say("pybind11 is not installed; skipping the CUDA core")
        return []
    exts = []
    if "core" in WANTED:
        exts.append(
            Extension(
                "geomoe_kernels._cuda_core",
                sources=["csrc/bindings.cpp"],
                include_dirs=[pybind11.get_include(), "csrc"],
                extra_compile_args=["-O2", "-std=c++17"],
                language="c++",
            )
        )
    if "emulated" in WANTED:
        exts.append(_emulated_extension(EMULATED, pybind11.get_include(), ["-g0"]))
    if "asan" in WANTED:
        exts.append(_emulated_extension(EMULATED + "_asan", pybind11.get_include(), emulation.ASAN_FLAGS))
    return exts


packages = find_packages(include=["geomoe_kernels", "geomoe_kernels.*"])
packages += find_packages(where="python", include=["geomoe", "geomoe.*"])

setup(
    packages=packages,
    package_dir={"geomoe": "python/geomoe"},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildCudaCore},
)
