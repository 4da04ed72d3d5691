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
    "rotated_iou_speedup_vs_torch",
    "rotated_nms_speedup_vs_torch",
    "rotated_roi_align_fraction_of_copy",
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
    assert "-cpu-smoke-" in path  # never the name of a cpu-mode run of the same commit
    result = json.load(open(tmp_path / path))
    assert SUMMARY_KEYS <= set(result["summary"])
    s = result["summary"]
    assert s["mode"] == "smoke"
    # the console's summary: every value marked as a smoke run's, under a note saying what that means
    table = proc.stdout[proc.stdout.index("| figure | value |") :].splitlines()
    values = [line for line in table[2:] if line.startswith("| ")]
    assert "Smoke run" in proc.stdout and len(values) >= len(SUMMARY_KEYS) - 4
    assert all(line.endswith("(smoke) |") or line.endswith("| - |") for line in values), values
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
        "rotated_iou_speedup_vs_torch",
        "rotated_nms_speedup_vs_torch",
        "rotated_roi_align_fraction_of_copy",
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
    for r in layer_rows:  # a peer that cannot run is recorded with its reason, never dropped, never timed
        assert bool(r.get("median_s")) != bool(r.get("unsupported")), r
    assert any(r.get("unsupported") for r in layer_rows)  # on a CPU: ScatterMoE, MegaBlocks, SonicMoE at least
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


def test_a_peer_that_cannot_run_is_skipped_with_its_reason_not_timed(tmp_path):
    """Timing a no-op for a peer that did not run put it at the top of pytest-benchmark's table
    (nanoseconds) and counted it as a passing item: it is skipped with the reason, and the record
    that benchmarks.run reads gets the row with that reason."""
    record = tmp_path / "unsupported.jsonl"
    env = dict(os.environ, GEOMOE_BENCH="smoke", GEOMOE_BENCH_UNSUPPORTED=str(record))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            "benchmarks/bench_moe.py",
            "-k",
            "fwdbwd and (megablocks or sonicmoe)",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    last = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode == 0 and "skipped" in last and "passed" not in last, proc.stdout[-2000:]
    assert "MegaBlocks is not in this suite yet" in proc.stdout and "SonicMoE is not in this suite yet" in proc.stdout
    assert "Min" not in proc.stdout  # no timing table: nothing was timed
    rows = [json.loads(line) for line in open(record)]
    assert {r["impl"] for r in rows} == {"megablocks", "sonicmoe"} and all(r["unsupported"] for r in rows)


def test_results_go_to_a_run_folder_and_never_overwrite_a_run(tmp_path, capsys):
    from benchmarks import run

    out = run.default_out()
    assert os.path.dirname(out) == os.path.join(ROOT, "runs", "benchmarks")  # not the tracked benchmarks/results
    with pytest.raises(SystemExit):
        run.main(["--help"])
    assert "(default: runs/benchmarks/<UTC time>)" in " ".join(capsys.readouterr().out.split())
    name = "2026-01-01-cpu-abc1234"
    assert run.free_stem(str(tmp_path), name) == str(tmp_path / name)
    (tmp_path / f"{name}.json").write_text("{}")
    assert run.free_stem(str(tmp_path), name) == str(tmp_path / f"{name}-2")
    (tmp_path / f"{name}-2.md").write_text("")
    assert run.free_stem(str(tmp_path), name) == str(tmp_path / f"{name}-3")


def _results(mode):
    rows = [
        {"name": "a", "group": "moe_layer", "impl": "geomoe", "tokens": 256, "median_s": 0.002, "tflops": 1.5},
        {
            "name": "b",
            "group": "moe_layer",
            "impl": "scattermoe",
            "tokens": 256,
            "median_s": None,
            "unsupported": "not installed",
        },
    ]
    summary = {
        "mode": mode,
        "moe_layer_speedup_vs_loop": 3.25,
        "grouped_gemm_fraction_of_mm": None,
        "card": "cpu",
        "commit": "abc1234",
    }
    return {"summary": summary, "machine": {"mode": mode}, "datetime": "2026-01-01", "rows": rows}


@pytest.mark.parametrize("mode", ["cpu", "smoke"])
def test_report_prints_the_table_of_a_results_file(tmp_path, mode):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(_results(mode)))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.report", str(path), "--no-plots"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    mark = " (smoke)" if mode == "smoke" else ""
    assert f"| moe_layer_speedup_vs_loop | 3.25{mark} |" in proc.stdout
    assert "| grouped_gemm_fraction_of_mm | - |" in proc.stdout  # no value: nothing to mark
    assert "| scattermoe | 256 | - |" in proc.stdout and "not installed" in proc.stdout
    assert ("Smoke run" in proc.stdout) == (mode == "smoke")
    assert (tmp_path / "r.md").read_text() in proc.stdout


def test_report_help_and_a_wrong_file_say_so():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.report", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "usage: python -m benchmarks.report" in proc.stdout and "RESULTS.json" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.report", "nope.json"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert (
        proc.returncode == 2
        and proc.stderr.strip().startswith("benchmarks.report: nope.json:")
        and "Traceback" not in proc.stderr
    )
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "--out" in proc.stdout
