"""The register budgets that prune the Triton autotune lists (geomoe_kernels/triton/_config.py): which
configs a launch may run, and what GEOMOE_TRITON_AUTOTUNE=0 keeps. tests/test_triton_offline.py
compiles what they admit and checks that none of it spills."""

import pytest
import torch

triton = pytest.importorskip("triton")

from geomoe_kernels.activations import Activation  # noqa: E402
from geomoe_kernels.triton import _config  # noqa: E402
from geomoe_kernels.triton import grouped_gemm as tg  # noqa: E402


def _tiles(configs):
    return [(c.kwargs["BN"], c.num_warps) for c in configs]


GEMM_LIST = [
    triton.Config({"BN": 64, "BK": 64}, num_warps=4),
    triton.Config({"BN": 64, "BK": 64}, num_warps=8),
    triton.Config({"BN": 128, "BK": 64}, num_warps=8),
    triton.Config({"BN": 128, "BK": 64}, num_warps=4),
    triton.Config({"BN": 32, "BK": 64}, num_warps=4),
]


def _launch(act=Activation.GELU, grad_act=Activation.NONE, bm=128, dtype=torch.bfloat16):
    return {"ACT": int(act), "GRAD_ACT": int(grad_act), "BM": bm, "A": torch.empty(0, dtype=dtype)}


def test_swiglu_keeps_only_the_tiles_whose_two_accumulators_fit(monkeypatch):
    monkeypatch.delenv("GEOMOE_TRITON_AUTOTUNE", raising=False)
    fwd = _config.admitted(GEMM_LIST, _launch(act=Activation.SWIGLU), tg._gemm_footprint, "A")
    dgrad = _config.admitted(GEMM_LIST, _launch(act=Activation.NONE, grad_act=Activation.SWIGLU), tg._gemm_footprint, "A")
    # 128 x 64 x 2 on 8 warps and 128 x 32 x 2 on 4 warps: 64 elements per thread each
    assert _tiles(fwd) == _tiles(dgrad) == [(64, 8), (32, 4)]


def test_interleaved_swiglu_forward_keeps_the_one_accumulator_tiles(monkeypatch):
    """Interleaved SwiGLU's forward holds one accumulator of (gate, up) pairs: the tiles GELU keeps,
    128 x 128 on 8 warps among them; its dgrad (d hidden beside pre's pairs) counts two, as concat's;
    its weight gradient in full precision counts the up half, as concat's."""
    monkeypatch.delenv("GEOMOE_TRITON_AUTOTUNE", raising=False)
    fwd = _config.admitted(GEMM_LIST, _launch(act=Activation.SWIGLU_INTERLEAVED), tg._gemm_footprint, "A")
    assert _tiles(fwd) == _tiles(_config.admitted(GEMM_LIST, _launch(), tg._gemm_footprint, "A"))
    assert (128, 8) in _tiles(fwd)
    dgrad = _config.admitted(
        GEMM_LIST, _launch(act=Activation.NONE, grad_act=Activation.SWIGLU_INTERLEAVED), tg._gemm_footprint, "A"
    )
    assert _tiles(dgrad) == [(64, 8), (32, 4)]
    fp32 = torch.empty(0, dtype=torch.float32)
    for act in (Activation.SWIGLU, Activation.SWIGLU_INTERLEAVED):
        args = {"A": fp32, "A_ACT": int(act), "IEEE": True, "BM": 64, "BK": 64, "BN": 64}
        assert tg._wgrad_footprint(args, 8) == 16 + 16


def test_single_accumulator_epilogues_keep_every_tile_within_the_budget(monkeypatch):
    monkeypatch.delenv("GEOMOE_TRITON_AUTOTUNE", raising=False)
    gelu = _config.admitted(GEMM_LIST, _launch(), tg._gemm_footprint, "A")
    assert _tiles(gelu) == [(64, 4), (64, 8), (128, 8), (32, 4)]  # 128 x 128 on 4 warps: 128 per thread
    # float32 operands (64-row blocks): the budget halves, 64 x 128 on 4 warps is 64 per thread
    fp32 = _config.admitted(GEMM_LIST, _launch(bm=64, dtype=torch.float32), tg._gemm_footprint, "A")
    assert _tiles(fp32) == [(64, 4), (64, 8), (128, 8), (32, 4)]
    fp32_swiglu = _config.admitted(GEMM_LIST, _launch(act=Activation.SWIGLU, bm=64, dtype=torch.float32), tg._gemm_footprint, "A")
    assert _tiles(fp32_swiglu) == [(64, 8), (32, 4)]


def test_128_by_256_tiles_only_for_bias_only_epilogues_in_16_bit(monkeypatch):
    """The shipped list's 128 x 256 tile (N = d: the down-projection forward, the up-projection
    dgrad) is admitted where the epilogue adds only the bias and the operands are 16-bit, not with an
    activation, act' or float32 operands (where it spilled, or would)."""
    if _config.INTERPRET:
        pytest.skip("the interpreter's pinned configs")
    monkeypatch.delenv("GEOMOE_TRITON_AUTOTUNE", raising=False)
    wide = lambda cs: [c for c in cs if c.kwargs["BN"] == 256]  # noqa: E731
    assert len(wide(tg._GEMM_CONFIGS)) == 1 and wide(tg._GEMM_CONFIGS)[0].num_warps == 8
    plain = _launch(act=Activation.NONE)
    assert wide(_config.admitted(tg._GEMM_CONFIGS, plain, tg._gemm_footprint, "A"))
    assert wide(_config.admitted(tg._GEMM_CONFIGS, dict(plain, A=torch.empty(0, dtype=torch.float16)), tg._gemm_footprint, "A"))
    for launch in (
        _launch(),
        _launch(act=Activation.SILU),
        _launch(act=Activation.NONE, grad_act=Activation.GELU),
        _launch(act=Activation.NONE, bm=64, dtype=torch.float32),
    ):
        assert not wide(_config.admitted(tg._GEMM_CONFIGS, launch, tg._gemm_footprint, "A")), launch
    assert tg._GEMM_CONFIGS[0].kwargs["BN"] == 64  # what GEOMOE_TRITON_AUTOTUNE=0 runs stays


def test_the_smallest_config_stays_when_every_one_is_over(monkeypatch):
    monkeypatch.delenv("GEOMOE_TRITON_AUTOTUNE", raising=False)
    big = [triton.Config({"BN": 256, "BK": 64}, num_warps=4), triton.Config({"BN": 128, "BK": 64}, num_warps=4)]
    kept = _config.admitted(big, _launch(act=Activation.SWIGLU), tg._gemm_footprint, "A")
    assert _tiles(kept) == [(128, 4)]


def test_autotune_off_runs_the_first_admitted_config(monkeypatch):
    monkeypatch.setenv("GEOMOE_TRITON_AUTOTUNE", "0")
    assert _tiles(_config.admitted(GEMM_LIST, _launch(act=Activation.SWIGLU), tg._gemm_footprint, "A")) == [(64, 8)]
    assert _tiles(_config.admitted(GEMM_LIST, _launch(), tg._gemm_footprint, "A")) == [(64, 4)]
    assert len(_config.admitted(GEMM_LIST, {}, None, None)) == 1  # kernels without a budget: the first
    assert _config._untimed(lambda: 1 / 0, quantiles=(0.5, 0.2, 0.8)) == [0.0, 0.0, 0.0]  # launches nothing
    assert _config.autotune_options()["do_bench"] is _config._untimed
    monkeypatch.setenv("GEOMOE_TRITON_AUTOTUNE", "1")
    assert _config.autotune_options()["do_bench"] is None  # Triton's own timing


def test_every_autotuned_kernel_prunes_through_the_budgets():
    """Each autotuned kernel carries the pruning hook, so GEOMOE_TRITON_AUTOTUNE=0 and the budgets
    reach all of them (a kernel without it would autotune over its whole list)."""
    import importlib

    from triton.runtime.autotuner import Autotuner

    from geomoe_kernels import triton as kernels

    found = []
    for module in kernels.modules():
        mod = importlib.import_module(module)
        found += [(module, name, k) for name, k in vars(mod).items() if isinstance(k, Autotuner)]
    assert len(found) >= 5
    assert all(k.early_config_prune is not None for _, _, k in found), [
        (s, n) for s, n, k in found if k.early_config_prune is None
    ]


def test_weight_gradient_budget_halves_for_fp32_and_counts_swiglus_second_a_half_in_full_precision(monkeypatch):
    monkeypatch.delenv("GEOMOE_TRITON_AUTOTUNE", raising=False)
    wgrad = [
        triton.Config({"BK": 64, "BN": 64, "BM": 32}, num_warps=4),
        triton.Config({"BK": 128, "BN": 64, "BM": 32}, num_warps=4),
        triton.Config({"BK": 64, "BN": 128, "BM": 32}, num_warps=4),
        triton.Config({"BK": 32, "BN": 64, "BM": 32}, num_warps=4),
    ]
    tile = lambda cs: [(c.kwargs["BK"], c.kwargs["BN"]) for c in cs]  # noqa: E731
    bf16, fp32 = torch.empty(0, dtype=torch.bfloat16), torch.empty(0, dtype=torch.float32)
    swiglu = {"A": bf16, "A_ACT": int(Activation.SWIGLU), "IEEE": False}
    assert tile(_config.admitted(wgrad, swiglu, tg._wgrad_footprint, "A")) == [(64, 64), (128, 64), (64, 128), (32, 64)]
    for ieee in (True, False):  # full precision or TF32: float32 operands, the budget halves
        gelu = {"A": fp32, "A_ACT": int(Activation.GELU), "IEEE": ieee}
        assert tile(_config.admitted(wgrad, gelu, tg._wgrad_footprint, "A")) == [(64, 64), (32, 64)]
    fp32_swiglu = {"A": fp32, "A_ACT": int(Activation.SWIGLU), "IEEE": True}  # 32 + 16 elements at 64 x 64: over
    assert tile(_config.admitted(wgrad, fp32_swiglu, tg._wgrad_footprint, "A")) == [(32, 64)]
