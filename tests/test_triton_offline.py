"""Every Triton kernel, as the launchers call it at GeoMoE's shapes in bf16 and float32 (full
precision and TF32), compiled for sm_90 here (no GPU needed) in every autotune config that the
register budgets leave to that launch: each build succeeds without spilling registers, and each
launch has a config within an H100's shared memory (the autotuner skips the ones over it). The
interpreter tests check the values; this checks what only the real compiler sees (it caught a
routing kernel needing 256 KB of shared memory, a depthwise conv spilling 0.5-7 KB per thread, and
autotune lists that offered tiles spilling up to 568 bytes)."""

import os

import pytest
import torch

triton = pytest.importorskip("triton")

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("the launch configs are the interpreter's pinned ones here", allow_module_level=True)
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
if not os.path.exists(PTXAS):
    pytest.skip("this Triton has no bundled ptxas to compile with", allow_module_level=True)


def test_every_shipped_config_compiles_for_sm90_without_spills():
    from tools.triton_offline import compile_all, problems, report

    rows = compile_all(arch=90, dtypes=(torch.bfloat16, torch.float32))
    names = {r.name for r in rows}
    assert {
        "_gating_kernel",
        "_scatter_kernel",
        "_gmm_kernel",
        "_wgrad_kernel",
        "_norm_linear_kernel",
        "_dwconv_kernel",
        "_unpermute_kernel",
    } <= names
    found = problems(rows, 90)
    assert not found, report(rows, 90)


def test_sass_units_and_occupancy_are_read_as_the_hardware_runs_them():
    """The mma column is the strongest tensor-core instruction in the SASS, tma any bulk tensor copy;
    a GEMM build on sm_90 without HGMMA is a problem (not for full-precision float32, which has no
    tensor-core form), one with HGMMA is not."""
    from tools.triton_offline import Compiled, ctas_per_sm, problems, sass_units

    hopper = "        /*0450*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;\n"
    ampere = "        /*0450*/              @!P0 HMMA.16816.F32.BF16 R24, R4, R8, R24 ;\n"
    tma = "        /*0300*/                   UTMALDG.2D [UR8], [UR4] ;\n"
    assert sass_units(hopper + ampere + tma) == ("HGMMA", True)
    assert sass_units(ampere) == ("HMMA", False)
    assert sass_units("        /*0010*/                   FFMA R1, R2, R3, R4 ;\n") == ("-", False)
    # 255 registers x 4 warps: 8,192 registers a warp-group's CTA, 8 by registers; 98,304 B of shared memory: 2
    assert ctas_per_sm(90, 255, 4, 98304) == 2 and ctas_per_sm(90, 96, 4, 0) == 5 and ctas_per_sm(90, 32, 1, 0) == 32
    row = dict(
        name="_gmm_kernel", launch=0, num_warps=4, num_stages=3, autotuned=True, registers=128, local_bytes=0, shared_bytes=1
    )
    slow = Compiled(variant="IEEE=False, BM=128; A:*bf16", mma="HMMA", **row)
    fast = Compiled(variant="IEEE=False, BM=128; A:*bf16", mma="HGMMA", **row)
    ieee = Compiled(variant="IEEE=True, BM=64; A:*fp32", mma="-", **row)
    assert len(problems([slow], 90)) == 1 and "not HGMMA" in problems([slow], 90)[0]
    assert problems([fast], 90) == [] and problems([ieee], 90) == [] and problems([slow], 80) == []
    # the persistent GEMM reads through tensor descriptors: a build without TMA copies is a problem
    persistent = dict(row, name="_gmm_persistent_kernel", variant="BM=128; A:*bf16", mma="HGMMA")
    assert problems([Compiled(tma=True, **persistent)], 90) == []
    assert ["no TMA" in p for p in problems([Compiled(tma=False, **persistent)], 90)] == [True]
    # two programs per SM (OCC=2) need two resident CTAs: 255 registers at 8 warps leave room for one
    crowded = dict(persistent, variant="BM=128, OCC=2; A:*bf16", num_warps=8, registers=255, tma=True)
    assert ["1 CTAs per SM for OCC=2" in p for p in problems([Compiled(ctas_per_sm=1, **crowded)], 90)] == [True]
    assert problems([Compiled(ctas_per_sm=2, **crowded)], 90) == []


def test_sm90_records_the_persistent_gemm_beside_the_pointer_kernel_and_sm80_only_the_latter():
    """The offline compile records the launches as a GPU of the target makes them: on sm_90 the
    grouped GEMM's 16-bit forward and dgrad go to the persistent TMA kernel and its weight gradient
    to the TMA one (float32 stays on the pointer kernels), on sm_80 (no TMA) all of them to the pointer kernel."""
    from tools.triton_offline import geomoe_launches

    def kernels(arch, dtype):
        return {c.name for c in geomoe_launches((dtype,), ["grouped_mm"], arch)}

    # float16: GeoMoE's shapes only (bfloat16 adds an LLM's, slow to make on the CPU)
    assert {"_gmm_kernel", "_gmm_persistent_kernel", "_wgrad_kernel", "_wgrad_tma_kernel"} <= kernels(90, torch.float16)
    pointer_only = kernels(80, torch.float16) | kernels(90, torch.float32)
    assert "_gmm_persistent_kernel" not in pointer_only and "_wgrad_tma_kernel" not in pointer_only
    assert "_gmm_kernel" in kernels(80, torch.float16)


def test_shipped_sm90_gemm_configs_issue_hgmma():
    """Every shipped config of the grouped GEMMs (forward, dgrad, weight gradient) in bf16 and TF32
    compiles to wgmma (HGMMA) without spills, the TMA kernels (persistent forward/dgrad, weight
    gradient) with TMA copies: what
    the hardware runs, read from the SASS."""
    from tools.triton_offline import GEMM_KERNELS, TMA_KERNELS, compile_all, needs_hgmma, report

    rows = compile_all(arch=90, dtypes=(torch.bfloat16,), ops=["expert_mlp", "grouped_mm"], only="_")
    gemm = [r for r in rows if r.name in GEMM_KERNELS]
    assert {r.name for r in gemm} == set(GEMM_KERNELS)
    bad = [
        r
        for r in gemm
        if r.error or r.local_bytes or (needs_hgmma(r, 90) and r.mma != "HGMMA") or (r.name in TMA_KERNELS and not r.tma)
    ]
    assert not bad, report(rows, 90)


def test_the_persistent_gemm_stores_whole_tiles_through_tma():
    """The persistent forward and dgrad (first config each, bf16, sm_90) write their output tiles with
    bulk tensor stores (UTMASTG) beside their TMA loads, and keep the pointer stores (STG) for the
    tiles whose expert ends mid-tile: read from the SASS."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tools import triton_offline as offline

    launches = [c for c in offline.geomoe_launches((torch.bfloat16,), ["grouped_mm"], 90) if c.name == "_gmm_persistent_kernel"]
    chosen = {c.kwargs["TRANS_W"]: c for c in launches}  # a forward and a dgrad
    assert set(chosen) == {False, True} and all(c.kwargs["TMA_STORE"] for c in chosen.values())
    for launch in chosen.values():
        jit, sig, cst, attrs, opts = offline._variants(launch, True)[0]
        kernel = triton.compile(
            ASTSource(fn=jit, signature=sig, constexprs=cst, attrs=attrs), target=GPUTarget("cuda", 90, 32), options=opts
        )
        ops = set(offline._OPCODE.findall(offline._sass(kernel.asm["cubin"], offline._cuobjdump())))
        assert {"UTMALDG", "UTMASTG", "STG"} <= ops, sorted(ops)


def test_the_persistent_routed_dgrad_stores_d_pre_through_tma():
    """The routed dgrad (expert_mlp's backward with routing weights, float16, sm_90) on the persistent
    kernel: HGMMA, W2 by TMA loads, d pre's whole tiles by bulk tensor stores (UTMASTG) beside the
    pointer stores (STG: the partials, the boundary tiles), in every config the register budget ships
    to it (128 x 32 on 8 warps: 128 x 64 spilled with Triton 3.6)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tools import triton_offline as offline

    launches = [
        c
        for c in offline.geomoe_launches((torch.float16,), ["expert_mlp"], 90)
        if c.name == "_gmm_persistent_kernel" and c.kwargs["ROUTED"]
    ]
    assert {c.kwargs["GRAD_ACT"] for c in launches} == {1, 3, 4}  # GELU, SwiGLU, interleaved SwiGLU
    for launch in launches:
        shipped = offline._shipped_configs(launch.kernel, launch)
        assert [(c.kwargs["BN"], c.num_warps) for c in shipped] == [(32, 8)]
        jit, sig, cst, attrs, opts = offline._variants(launch, True)[0]
        kernel = triton.compile(
            ASTSource(fn=jit, signature=sig, constexprs=cst, attrs=attrs), target=GPUTarget("cuda", 90, 32), options=opts
        )
        ops = set(offline._OPCODE.findall(offline._sass(kernel.asm["cubin"], offline._cuobjdump())))
        assert {"HGMMA", "UTMALDG", "STG"} <= ops, sorted(ops)
        assert launch.kwargs["TMA_STORE"] and {"UTMASTG"} <= ops, sorted(ops)
