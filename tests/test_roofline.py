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
    # the column tile fastest: every GEMM moves its minimum at GeoMoE's shapes; at 65,536 tokens
    # that takes the interleaved expert order of the gathered up-projection (its 100 MB of tokens
    # outgrow L2, its 20 MB of weights do not)
    for shape in ("geomoe-15680", "geomoe-65536"):
        for r in (r for r in roofline.kernels(shape) if r.flops):
            if (shape, r.kernel) != ("geomoe-65536", "up_proj_wgrad"):
                assert r.design_bytes <= 1.3 * r.min_bytes, r
    assert all(r.design_bytes == r.min_bytes for r in gemms)


def test_weight_gradient_rows_write_float32_once_and_read_the_gathered_tokens():
    """The weight gradients: dW and db in float32 written once (no partials, no cast), the bias from
    G's loads; the up-projection's A is the tokens gathered through the routing, whose minimum is
    the tokens once. Within 1.3x of the minimum at 15,680 tokens (all in L2) and at the LLM shape;
    at 65,536 tokens the gathered tokens (100 MB) outgrow L2 and the experts, run one after another,
    read every routed row: 1.55x, the one GEMM over 1.3x at GeoMoE's shapes. Kept: reading each token
    once needs the experts' row sums in token windows that fit L2 (<= ~33 MB of the 100 MB: three
    passes), and every pass after the first reads and writes the float32 dW (41 MB) once more:
    +163 MB against the 202 MB of repeated token reads saved, 1.44x at best, for three launches."""
    for shape in ("geomoe-15680", "geomoe-65536", "llm-16384"):
        s = roofline.SHAPES[shape]
        T, d, h, E, k = s["tokens"], s["d"], s["h"], s["E"], s["k"]
        n1 = 2 * h if s["gated"] else h
        rows = {r.kernel: r for r in roofline.kernels(shape)}
        up, down = rows["up_proj_wgrad"], rows["down_proj_wgrad"]
        assert up.flops == down.flops * n1 / h == 2.0 * T * k * d * n1
        assert up.min_bytes == T * d * 2 + T * k * n1 * 2 + E * (d * n1 + n1) * 4  # tokens once, G, dW + db
        assert down.min_bytes == T * k * (n1 + d) * 2 + E * (h * d + d) * 4
        assert down.design_bytes <= 1.3 * down.min_bytes
        if shape != "geomoe-65536":
            assert up.design_bytes <= 1.3 * up.min_bytes, up
    up = next(r for r in roofline.kernels("geomoe-65536") if r.kernel == "up_proj_wgrad")
    assert up.design_bytes - up.min_bytes == 65536 * 3 * 768 * 2 - 65536 * 768 * 2
    assert round(up.design_bytes / up.min_bytes, 2) == 1.55


def test_the_gathered_up_projection_costs_every_routed_row_in_expert_order(monkeypatch):
    """In expert order the 65,536 gathered tokens leave L2 between the top-3 experts that read them:
    the model charges every routed row, as it still does at the LLM shape, whose 805 MB of weights
    keep expert order (kernel_recipes.interleaves_experts, the decision the Triton launch takes)."""
    llm = next(r for r in roofline.kernels("llm-16384") if r.kernel == "up_proj_fwd")
    assert llm.design_bytes - llm.min_bytes == 16384 * 8 * 2048 * 2 - 16384 * 2048 * 2
    up = next(r for r in roofline.kernels("geomoe-65536") if r.kernel == "up_proj_fwd")
    assert up.design_bytes == up.min_bytes
    monkeypatch.setattr(roofline, "interleaves_experts", lambda gathered, w, l2: False)
    up = next(r for r in roofline.kernels("geomoe-65536") if r.kernel == "up_proj_fwd")
    gathered, tokens = 65536 * 3 * 768 * 2, 65536 * 768 * 2
    assert up.design_bytes - up.min_bytes == gathered - tokens
    assert round(up.design_bytes / up.min_bytes, 2) == 1.35


def test_json_rows_have_the_documented_keys():
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.roofline", "--json"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    rows = json.loads(out)
    decode = {f"llm-decode-{t}" for t in roofline.DECODE_TOKENS}
    assert {r["shape"] for r in rows} == {"geomoe-15680", "geomoe-65536", "llm-16384"} | decode
    assert all(set(r) == {"kernel", "shape", "tokens", "flops", "min_bytes", "design_bytes", "bound_us"} for r in rows)


def test_decode_reads_each_touched_expert_once_and_batched_mm_a_copy_per_routed_row():
    """At 1 token x top-8 both read 8 experts' weights, batched_mm three times over (its index copy
    written and read); at 64 tokens the 512 routed rows touch ~126 of 128 experts: 12x the bytes."""
    s = roofline.SHAPES["llm-16384"]
    per_expert = (s["d"] * 2 * s["h"] + s["h"] * s["d"]) * 2
    for tokens in roofline.DECODE_TOKENS:
        ours, hf = roofline.decode_kernels(tokens)
        assert ours.design_bytes == ours.min_bytes == hf.min_bytes and ours.flops == hf.flops > 0
        touched = roofline.experts_touched(tokens, s["E"], s["k"])
        assert touched <= min(s["E"], tokens * s["k"]) + 1e-9
        repeated_x = 2 * tokens * s["k"] * s["d"] * 2  # its repeat_interleave of the tokens, written and read
        extra = hf.design_bytes - ours.design_bytes - repeated_x
        assert abs(extra - (3 * tokens * s["k"] - touched) * per_expert) < 1e-6 * per_expert
    one = roofline.decode_kernels(1)
    assert abs(roofline.experts_touched(1, 128, 8) - 8) < 1e-9 and 2.9 < one[1].design_bytes / one[0].design_bytes < 3.0
    many = roofline.decode_kernels(64)
    assert 11 < many[1].design_bytes / many[0].design_bytes < 13
