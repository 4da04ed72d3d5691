"""benchmarks/gpu_check.sh rehearsed on the CPU (GEOMOE_REHEARSE=1): the device run's script keeps
working between the rare sessions that have a GPU, and packs what a return folder can take."""

import os
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_runs_its_steps_and_packs_the_results(tmp_path):
    ret, work = tmp_path / "return", tmp_path / "work"
    ret.mkdir()
    env = dict(
        os.environ,
        OUT=str(ret),
        GEOMOE_GPU_OUT=str(work),
        GEOMOE_REHEARSE="1",
        GEOMOE_BENCH="smoke",
        PYTHON=sys.executable,
        GEOMOE_GPU_BUDGET="400",
        GEOMOE_GPU_STEPS="info,benchmarks,profile,verify",
        GEOMOE_BENCH_K="gating",
        GEOMOE_PROFILE_ARGS="--backends=torch --front-ends= --tokens 64",
        GEOMOE_COMMIT="rehearsal",
    )
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = sorted(os.listdir(ret))
    assert "gpu_check.tgz" in names and "gpu_check.log" in names and any(n.endswith("-rehearsal.json") for n in names), names
    assert len(names) <= 8  # what a device tool's return folder takes
    with tarfile.open(ret / "gpu_check.tgz") as tar:
        packed = {os.path.basename(n) for n in tar.getnames()}
    assert {"info.log", "benchmarks.log", "profile.log", "verify.log"} <= packed
    log = open(ret / "gpu_check.log").read()
    assert "failed (rc" not in log and "done, status 0" in log, log
