"""Install geomoe_kernels (the library) and geomoe (the application, from python/).

The CUDA core in csrc/ needs only nvcc and the CUDA runtime, never torch's headers. Where it cannot
be built (no sources yet, no nvcc) the install says so in one line and goes on: every op still runs
on the reference implementation."""
import glob
import os
import shutil

from setuptools import find_packages, setup


def _cuda_note() -> str:
    sources = glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True)
    if not sources:
        return "geomoe_kernels: no CUDA C++ sources in csrc/ yet; installing the Python packages only"
    nvcc = shutil.which("nvcc") or (os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"))
    if not os.path.exists(nvcc):
        return "geomoe_kernels: nvcc not found (set CUDA_HOME); skipping the CUDA core, the other backends work"
    return "geomoe_kernels: the CUDA core build is not wired into setup.py yet; skipping it"


print(_cuda_note())

packages = find_packages(include=["geomoe_kernels", "geomoe_kernels.*"])
packages += find_packages(where="python", include=["geomoe", "geomoe.*"])

setup(
    packages=packages,
    package_dir={"geomoe": "python/geomoe"},
)
