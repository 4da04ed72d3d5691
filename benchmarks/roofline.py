"""A roofline model of every kernel of one MoE layer, forward and backward, to read GPU timings
against: python -m benchmarks.roofline [--json]

For each kernel at GeoMoE's shapes (15,680 and 65,536 tokens; d 768, expert hidden 576 GELU,
23 experts, top-3) and an LLM shape (16,384 tokens; d 2048, hidden 768 SwiGLU, 128 experts, top-8),
all bf16 with float32 routing, it gives:
- flops: the multiply-adds of the GEMMs (x2), zero for the data-movement kernels;
- min_bytes: each input read once and each output written once from DRAM;
- design_bytes: what this implementation's tiles and launch order move. The GEMMs run one grid
  axis with the column tile fastest: the programs that run together share one row block of A, so
  A comes from DRAM once. Their row blocks run one expert after another (W read once per expert),
  except where A is gathered from the tokens (the up-projection reading them through the routing)
  and all experts' weights fit in half the L2 (kernel_recipes.interleaves_experts, as both the
  Triton and the CUDA launch decide it): then the blocks run interleaved across experts in token order, the tokens in
  flight (a few row blocks of every expert) stay in L2 and each token comes from DRAM once, W once
  in all. In expert order a gathered A costs the tokens once while they fit in L2, else every
  gathered row. The weight-gradient grid puts the (K, N) tile fastest, one expert and row split
  after another: that expert's rows of A and G come from DRAM once while they fit in L2, else once
  per N tile and once per K tile; its gathered A (the up-projection's tokens) costs the tokens once
  while they fit in L2, else every gathered row (the experts run one after another, and a token's
  top-k experts rarely run together). The bias gradient comes from the same loads of G, and dW
  (float32) is written once, straight into the gradient. Tiles are the first autotune config (what
  GEOMOE_TRITON_AUTOTUNE=0 runs); a tuned run may pick another, so design_bytes is a model, not a
  measurement;
- bound_us: the H100 lower bound, max(flops / 989 TFLOP/s, min_bytes / 3.35 TB/s).
Then the LLM shape's expert MLP at decode sizes (1, 8 and 64 tokens), ours beside transformers'
batched_mm experts (decode_kernels): there the weights are all the bytes there are.
The shared expert (a dense GEMM) and the router's GEMM (d x E) are left out: cuBLAS runs both."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from typing import List

from geomoe_kernels.kernel_recipes import H100_L2_BYTES, interleaves_experts

PEAK_FLOPS = 989e12  # H100 SXM dense bf16
PEAK_BYTES = 3.35e12  # H100 SXM HBM3
L2_BYTES = H100_L2_BYTES
IN_FLIGHT_PROGRAMS = 132 * 2  # H100 SXM: 132 SMs, two GEMM programs each
GEMM_TILE = dict(BM=128, BN=64, BK=64)  # the first config of triton/grouped_gemm.py's forward/dgrad kernel
WGRAD_TILE = dict(BK=128, BN=128)  # and of its weight-gradient kernel
BF16, F32, I64 = 2, 4, 8

SHAPES = {
    "geomoe-15680": dict(tokens=15680, d=768, h=576, E=23, k=3, gated=False),
    "geomoe-65536": dict(tokens=65536, d=768, h=576, E=23, k=3, gated=False),
    "llm-16384": dict(tokens=16384, d=2048, h=768, E=128, k=8, gated=True),
}


@dataclass
class Row:
    kernel: str
    shape: str
    tokens: int
    flops: float
    min_bytes: float
    design_bytes: float
    bound_us: float


def _gemm(kernel, shape, M, K, N, E, a_min, a_bytes, out_bytes, extra_read=0.0, gathered=False):
    """A [M, K] (a_min from DRAM at least, a_bytes as streamed: more when gathered) @ W [E, K, N] ->
    out; extra_read: an operand read per output element (the pre-activation in a fused epilogue);
    gathered: A's rows are read through the routing (a_min the tokens, a_bytes the routed rows)."""
    w = E * K * N * BF16
    a_design = a_min if a_min <= L2_BYTES else a_bytes
    if interleaves_experts(gathered, w, L2_BYTES):
        # each round runs one row block of every expert, which spans BM * E / M of the tokens
        rounds_in_flight = IN_FLIGHT_PROGRAMS / math.ceil(N / GEMM_TILE["BN"]) / E + 1
        window = rounds_in_flight * GEMM_TILE["BM"] * E / M * a_min
        if window + w <= L2_BYTES:
            a_design = a_min
    design = a_design + w + out_bytes + extra_read
    return dict(kernel=kernel, flops=2.0 * M * K * N, min_bytes=a_min + w + out_bytes + extra_read, design_bytes=design)


def _wgrad(kernel, shape, M, K, N, E, a_bytes, g_bytes, a_min=None):
    """dW [E, K, N] (float32, written once) = A^T G per expert, and the bias gradient from the same
    loads of G; a_min: A's least bytes where its rows are gathered from the tokens (a_bytes the
    routed rows)."""
    out = E * K * N * F32 + E * N * F32
    a_min = a_bytes if a_min is None else a_min
    a_design = a_min if a_min <= L2_BYTES else a_bytes
    fits = (a_bytes + g_bytes) / E <= L2_BYTES  # one expert's rows (less with the row splits)
    design = (
        a_design + g_bytes if fits else a_bytes * math.ceil(N / WGRAD_TILE["BN"]) + g_bytes * math.ceil(K / WGRAD_TILE["BK"])
    ) + out
    return dict(kernel=kernel, flops=2.0 * M * K * N, min_bytes=a_min + g_bytes + out, design_bytes=design)


def kernels(name: str) -> List[Row]:
    s = SHAPES[name]
    T, d, h, E, k = s["tokens"], s["d"], s["h"], s["E"], s["k"]
    M, n1 = T * k, (2 * h if s["gated"] else h)  # routed rows; the up-projection's width
    x, rows_d, rows_h, rows_n1 = T * d * BF16, M * d * BF16, M * h * BF16, M * n1 * BF16
    out = [
        dict(kernel="gating", flops=0.0, min_bytes=T * E * F32 + T * k * (F32 + I64) + E * (I64 + F32)),
        dict(kernel="route", flops=0.0, min_bytes=M * I64 * 3),
        dict(kernel="permute", flops=0.0, min_bytes=x + rows_d),  # standalone; the GEMM below gathers in its load
        # forward: up-projection gathering x through the routing (keeps pre; writes the activation)
        _gemm("up_proj_fwd", name, M, d, n1, E, x, rows_d, rows_h + rows_n1, gathered=True),
        _gemm("down_proj_fwd", name, M, h, d, E, rows_h, rows_h, rows_d),
        dict(kernel="unpermute", flops=0.0, min_bytes=rows_d + 2 * x + T * k * F32),
        # backward
        dict(kernel="unpermute_bwd", flops=0.0, min_bytes=x + rows_d + T * k * F32),
        _gemm("down_proj_dgrad", name, M, d, h, E, rows_d, rows_d, rows_n1, extra_read=rows_n1),  # act' from pre
        _wgrad("down_proj_wgrad", name, M, h, d, E, rows_n1, rows_d),  # act(pre) formed in the load
        _gemm("up_proj_dgrad", name, M, n1, d, E, rows_n1, rows_n1, rows_d),
        _wgrad("up_proj_wgrad", name, M, d, n1, E, rows_d, rows_n1, a_min=x),  # A gathered from x again
        dict(kernel="permute_bwd", flops=0.0, min_bytes=rows_d + x),
    ]
    rows = []
    for r in out:
        r.setdefault("design_bytes", r["min_bytes"])
        bound = max(r["flops"] / PEAK_FLOPS, r["min_bytes"] / PEAK_BYTES) * 1e6
        rows.append(Row(shape=name, tokens=T, bound_us=bound, **r))
    return rows


DECODE_TOKENS = (1, 8, 64)


def experts_touched(tokens: int, E: int, k: int) -> float:
    """Expected experts with rows when each of `tokens` picks k of E uniformly at random."""
    return E * (1.0 - (1.0 - k / E) ** tokens)


def decode_kernels(tokens: int) -> List[Row]:
    """The LLM shape's expert MLP forward (both GEMMs; the activations are a rounding error beside
    the weights here) at a decode size, ours and transformers' batched_mm. Ours reads each expert
    that has rows once (one row block each: a decode step never fills 128 rows of an expert), the
    minimum. batched_mm indexes the stacked weights by each routed row's expert (W[expert_ids]),
    which copies one expert's weights per routed row (read and written) before the batched matmul
    reads the copy again: 3 x tokens x top_k expert weights, against the experts touched once."""
    s = SHAPES["llm-16384"]
    d, h, E, k = s["d"], s["h"], s["E"], s["k"]
    n1, M = 2 * h if s["gated"] else h, tokens * k
    per_expert = (d * n1 + h * d) * BF16
    acts = (tokens * d + M * n1 + 2 * M * h + M * d) * BF16  # x; pre; the activation written and read; out
    least = experts_touched(tokens, E, k) * per_expert + acts
    flops = 2.0 * M * (d * n1 + h * d)
    bound = max(flops / PEAK_FLOPS, least / PEAK_BYTES) * 1e6
    shape = f"llm-decode-{tokens}"
    return [
        Row("expert_mlp_decode", shape, tokens, flops, least, least, bound),
        Row("hf_batched_mm_decode", shape, tokens, flops, least, 3.0 * M * per_expert + acts + 2 * M * d * BF16, bound),
    ]


def layer_bound_us(tokens: int) -> float:
    """The MoE layer's forward + backward bound at GeoMoE's shape (sum over its kernels)."""
    SHAPES.setdefault(f"geomoe-{tokens}", dict(SHAPES["geomoe-15680"], tokens=tokens))
    return sum(r.bound_us for r in kernels(f"geomoe-{tokens}") if r.kernel != "permute")


def kernels_bound_us(tokens: int, names) -> float:
    """The summed bound of the named kernels at GeoMoE's shape and `tokens`."""
    SHAPES.setdefault(f"geomoe-{tokens}", dict(SHAPES["geomoe-15680"], tokens=tokens))
    return sum(r.bound_us for r in kernels(f"geomoe-{tokens}") if r.kernel in names)


def up_proj_bound_us(tokens: int) -> float:
    SHAPES.setdefault(f"geomoe-{tokens}", dict(SHAPES["geomoe-15680"], tokens=tokens))
    return next(r.bound_us for r in kernels(f"geomoe-{tokens}") if r.kernel == "up_proj_fwd")


def table(rows: List[Row]) -> str:
    lines = [f"{'shape':<14} {'kernel':<16} {'GFLOP':>8} {'min MB':>9} {'design MB':>10} {'design/min':>10} {'bound us':>9}"]
    for r in rows:
        lines.append(
            f"{r.shape:<14} {r.kernel:<16} {r.flops / 1e9:>8.1f} {r.min_bytes / 1e6:>9.1f} {r.design_bytes / 1e6:>10.1f} "
            f"{r.design_bytes / r.min_bytes:>10.2f} {r.bound_us:>9.1f}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="one JSON object per row")
    args = ap.parse_args(argv)
    rows = [r for name in ("geomoe-15680", "geomoe-65536", "llm-16384") for r in kernels(name)]
    rows += [r for tokens in DECODE_TOKENS for r in decode_kernels(tokens)]
    if args.json:
        keys = ("kernel", "shape", "tokens", "flops", "min_bytes", "design_bytes", "bound_us")
        print(json.dumps([{k: asdict(r)[k] for k in keys} for r in rows], indent=1))
    else:
        print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
