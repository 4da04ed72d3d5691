"""The benchmark pipeline end to end on tiny shapes: pytest-benchmark -> results JSON with the
summary -> markdown and plots. (The timings themselves live in benchmarks/, never in tests.)"""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUMMARY_KEYS = {
    "moe_layer_fwdbwd_tflops",
    "moe_layer_speedup_vs_loop",
    "moe_layer_speedup_vs_grouped_mm",
    "grouped_gemm_fraction_of_mm",
    "permute_fraction_of_copy",
    "front_end_speedup_vs_dense",
    "train_step_speedup_vs_original",
    "train_step_speedup_vs_dense_front_end",
    "train_step_images_per_s",
    "norm_linear_fc1_fraction_of_mm",
    "norm_linear_fc1_speedup_vs_torch",
    "masked_dwconv_fraction_of_copy",
    "card",
    "torch",
    "commit",
    "moe_layer_speedup_vs_best_peer",
    "cuda_grouped_gemm_fraction_of_mm",
}


def test_run_writes_results_summary_table_and_plot(tmp_path):
    env = dict(os.environ, GEOMOE_BENCH="smoke")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    [path] = [p for p in os.listdir(tmp_path) if p.endswith(".json")]
    result = json.load(open(tmp_path / path))
    assert SUMMARY_KEYS <= set(result["summary"])
    s = result["summary"]
    for key in (
        "moe_layer_speedup_vs_loop",
        "front_end_speedup_vs_dense",
        "train_step_speedup_vs_original",
        "grouped_gemm_fraction_of_mm",
        "permute_fraction_of_copy",
        "train_step_speedup_vs_dense_front_end",
        "norm_linear_fc1_fraction_of_mm",
        "norm_linear_fc1_speedup_vs_torch",
        "masked_dwconv_fraction_of_copy",
    ):
        assert isinstance(s[key], float) and s[key] > 0, key
    groups = {r["group"] for r in result["rows"]}
    assert {
        "moe_layer",
        "gating",
        "permute",
        "unpermute",
        "grouped_gemm",
        "front_end",
        "cblock",
        "train_step",
        "norm_linear",
        "masked_dwconv",
    } <= groups
    from benchmarks.peers import PEERS

    layer_rows = [r for r in result["rows"] if r["group"] == "moe_layer"]
    assert {r["impl"] for r in layer_rows} == {"geomoe", "reference", "grouped_mm", "loop", *PEERS}  # CUDA-only ones skip
    for r in layer_rows:  # a peer that cannot run is recorded with its reason, never dropped
        assert r.get("median_s") or r.get("unsupported"), r
    assert os.path.exists(tmp_path / path.replace(".json", ".md"))
    assert os.path.exists(tmp_path / path.replace(".json", "-moe-layer.png"))


def test_headline_benchmarks_run_first_and_a_spent_budget_skips_the_rest():
    env = dict(os.environ, GEOMOE_BENCH="smoke")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    # smoke mode has one size, the reference one: its grouped GEMM and permutation rows are headline too
    marks = ("test_pretrain_step", "[0.75-", "uniform", "test_grouped_gemm_up_projection[", "test_permute[")
    headline = [i for i, n in enumerate(ids) if any(m in n for m in marks)]
    assert headline == list(range(len(headline))) and len(headline) >= 9, ids[:12]
    env["GEOMOE_BENCH_DEADLINE"] = "0"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "benchmarks/bench_moe.py", "-p", "no:cacheprovider", "-k", "gating"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    last = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode == 0 and "skipped" in last and "passed" not in last, proc.stdout[-1000:]


@pytest.mark.parametrize("peer", ["grouped_mm", "hf_grouped_mm", "hf_batched_mm"])
@pytest.mark.parametrize("kind", ["geomoe", "llm"])
def test_peer_layers_compute_the_same_layer(peer, kind):
    """The baselines are timed as the same layer: outputs, aux and load equal MoEMLP's (float32, the
    routers compute in float32), at GeoMoE's configuration and the LLM one (softmax top-k, SwiGLU,
    no shared expert)."""
    from benchmarks import common as C
    from benchmarks import peers as P
    from geomoe_kernels import MoEMLP

    if peer.startswith("hf_"):
        pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "geomoe":
        moe = MoEMLP(32, 24, 6, 1, 2)
    else:
        moe = MoEMLP(32, 24, 6, 0, 3, score_func="softmax", activation="swiglu")
    with torch.no_grad():
        moe.expert_bias.copy_(torch.randn(6))
        for p in (moe.b1, moe.b2):
            p.normal_()
    x = torch.randn(50, 32)
    layer = C.GroupedMMLayer(moe) if peer == "grouped_mm" else P.make(peer, moe, 50)
    got, want = layer(x), moe(x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.to(b.dtype), b)


def test_a_peer_import_cannot_patch_transformers(tmp_path, monkeypatch):
    """A peer package that, on import, replaces a transformers class's forward (as ScatterMoE's does
    for GPT-OSS) is imported with transformers hidden: the class stays as it was."""
    pytest.importorskip("transformers")
    from transformers.models.mixtral import modeling_mixtral

    from benchmarks import peers as P

    pkg = tmp_path / "patching_peer"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "try:\n"
        "    from transformers.models.mixtral.modeling_mixtral import MixtralExperts\n"
        "    MixtralExperts.forward = None\n"
        "except Exception:\n"
        "    pass\n"
        "VALUE = 7\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    before = modeling_mixtral.MixtralExperts.forward
    peer = P.import_hiding("patching_peer", "transformers")
    assert peer.VALUE == 7
    assert modeling_mixtral.MixtralExperts.forward is before
    assert sys.modules["transformers.models.mixtral.modeling_mixtral"] is modeling_mixtral
    monkeypatch.delitem(sys.modules, "patching_peer")
