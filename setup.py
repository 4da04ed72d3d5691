"""Install geomoe_kernels (the library) and geomoe (the application, from python/), and build the
CUDA core in csrc/ into geomoe_kernels/_cuda_core.

The CUDA core needs only nvcc and the CUDA runtime (linked statically), never torch's headers, so
it builds on a CPU-only machine and one binary works with any torch. Architectures come from
GEOMOE_CUDA_ARCHS (default "80;90a"). The compiler's resource report (registers, stack, spills per
kernel) is written to geomoe_kernels/_cuda_build.txt. Where nvcc is missing or the build fails, the
install says so in one line and goes on without it, unless GEOMOE_REQUIRE_CUDA=1 (CI) makes it an
error."""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
REQUIRE = os.environ.get("GEOMOE_REQUIRE_CUDA") == "1"


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


def _say(msg: str) -> None:
    print(f"geomoe_kernels: {msg}", file=sys.stderr)


class BuildCudaCore(build_ext):
    def build_extensions(self):
        try:
            self._compile_cuda(self.extensions[0])
        except Exception as exc:  # no nvcc, or a compile error
            if REQUIRE:
                raise
            _say(f"the CUDA core was not built ({exc}); the torch and Triton backends work without it")
            self.extensions = []
            return
        super().build_extensions()

    def _compile_cuda(self, ext):
        nvcc = _nvcc()
        if nvcc is None:
            raise RuntimeError("nvcc not found (set CUDA_HOME)")
        cuda = os.path.dirname(os.path.dirname(nvcc))
        archs = [a for a in os.environ.get("GEOMOE_CUDA_ARCHS", "80;90a").split(";") if a]
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        os.makedirs(self.build_temp, exist_ok=True)
        objects, report = [], []
        for src in sorted(glob.glob(os.path.join(HERE, "csrc", "*.cu"))):
            obj = os.path.join(self.build_temp, os.path.basename(src) + ".o")
            cmd = [nvcc, "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xptxas", "-v", "-lineinfo", *gencode, "-c", src, "-o", obj]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"nvcc failed on {os.path.basename(src)}:\n{proc.stderr[-4000:]}")
            report.append(proc.stderr)
            objects.append(obj)
        text = "".join(report)
        spills = [int(x) for x in re.findall(r"(\d+) bytes spill stores", text)]
        stacks = [int(x) for x in re.findall(r"(\d+) bytes stack frame", text)]
        regs = [int(x) for x in re.findall(r"Used (\d+) registers", text)]
        summary = (f"archs {';'.join(archs)}; {len(regs)} kernel builds; max registers {max(regs, default=0)}; "
                   f"max stack {max(stacks, default=0)} bytes; spill stores {sum(spills)} bytes")
        with open(os.path.join(HERE, "geomoe_kernels", "_cuda_build.txt"), "w") as f:
            f.write(f"# nvcc {nvcc}\n# {summary}\n{text}")
        _say(f"built the CUDA core with {nvcc}: {summary}")
        ext.extra_objects = objects
        ext.include_dirs += [os.path.join(cuda, "include")]
        ext.library_dirs += [os.path.join(cuda, "lib64"), os.path.join(cuda, "lib")]
        ext.libraries += ["cudart_static", "dl", "rt", "pthread"]
        ext.define_macros += [("GEOMOE_CUDA_ARCHS", f'"{";".join(archs)}"')]


def _extensions():
    try:
        import pybind11
    except ImportError:
        _say("pybind11 is not installed; skipping the CUDA core")
        return []
    return [Extension("geomoe_kernels._cuda_core", sources=["csrc/bindings.cpp"], include_dirs=[pybind11.get_include(), "csrc"],
                      extra_compile_args=["-O2", "-std=c++17"], language="c++")]


packages = find_packages(include=["geomoe_kernels", "geomoe_kernels.*"])
packages += find_packages(where="python", include=["geomoe", "geomoe.*"])

setup(
    packages=packages,
    package_dir={"geomoe": "python/geomoe"},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildCudaCore},
)
