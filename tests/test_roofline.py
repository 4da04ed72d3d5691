"""benchmarks.roofline: the model's FLOPs agree with the benchmark's FLOP count, bytes are sane, and
--json has the documented keys."""

import json
import subprocess
import sys

from benchmarks import roofline


def test_gemm_flops_match_the_layer_count_and_bounds_are_positive():
    rows = roofline.kernels("geomoe-15680")
    s = roofline.SHAPES["geomoe-15680"]
    routed = 2 * s["tokens"] * s["k"] * s["d"] * s["h"]  # one GEMM's FLOPs over the routed rows
    gemms = [r for r in rows if r.flops]
    assert len(gemms) == 6 and all(abs(r.flops - routed) < 1 for r in gemms)  # 2 forward, 4 backward
    for r in rows:
        assert r.bound_us > 0 and r.design_bytes >= r.min_bytes > 0, r
    # the column tile fastest: every GEMM moves its minimum at 15,680 tokens (the 24 MB of gathered
    # tokens stay in L2); at 65,536 the 100 MB of tokens do not, and the gathered rows come from DRAM
    assert all(r.design_bytes == r.min_bytes for r in gemms)
    up = next(r for r in roofline.kernels("geomoe-65536") if r.kernel == "up_proj_fwd")
    gathered, tokens = 65536 * 3 * 768 * 2, 65536 * 768 * 2
    assert up.design_bytes - up.min_bytes == gathered - tokens


def test_json_rows_have_the_documented_keys():
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.roofline", "--json"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    rows = json.loads(out)
    assert {r["shape"] for r in rows} == {"geomoe-15680", "geomoe-65536", "llm-16384"}
    assert all(set(r) == {"kernel", "shape", "tokens", "flops", "min_bytes", "design_bytes", "bound_us"} for r in rows)
