"""Run the benchmark suite and record it: python -m benchmarks.run [--out DIR] [-k EXPR]

Writes <date>-<card>-<commit>.json (a `summary` of the headline figures, the machine, and every
row with its time, TFLOP/s or GB/s and fraction of the ceilings measured in the same run), the
markdown table beside it, and the plots (benchmarks/report.py), into a folder of its own under
runs/benchmarks/ by default; `--out benchmarks/results` is how a run's results are committed. A
smoke run (GEOMOE_BENCH=smoke: one round on tiny shapes) says so in its file names
(<date>-<card>-smoke-<commit>) and in every summary value, and no run overwrites another's files."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _row(b: Dict[str, Any]) -> Dict[str, Any]:
    info = dict(b.get("extra_info", {}))
    stats = b.get("stats") or {}  # a benchmark that cannot run is skipped, never timed: see record_unsupported
    median = stats.get("median")
    row = {
        "name": b["name"],
        **info,
        "median_s": median,
        "mean_s": stats.get("mean"),
        "stddev_s": stats.get("stddev"),
        "rounds": stats.get("rounds"),
    }
    if median:
        if info.get("flops"):
            row["tflops"] = info["flops"] / median / 1e12
            if info.get("mm_tflops"):
                row["fraction_of_mm"] = row["tflops"] / info["mm_tflops"]
        if info.get("bytes"):
            row["gbps"] = info["bytes"] / median / 1e9
            if info.get("copy_gbps"):
                row["fraction_of_copy"] = row["gbps"] / info["copy_gbps"]
        if info.get("images"):
            row["images_per_s"] = info["images"] / median
    return row


def _find(rows, **match) -> Optional[Dict[str, Any]]:
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()) and r.get("median_s"):
            return r
    return None


def _ratio(a, b) -> Optional[float]:
    return a["median_s"] / b["median_s"] if a and b else None


def _vs_best_peer(rows: List[Dict[str, Any]], group: str, passes: str, **match) -> Optional[float]:
    """The fastest peer's time over ours in one group of layer rows (one pass; `match` picks a size
    where the group has several)."""
    ours = _find(rows, group=group, impl="geomoe", passes=passes, **match)
    peers = [
        r
        for r in rows
        if r.get("group") == group
        and r.get("passes") == passes
        and r.get("peer")
        and r.get("median_s")
        and all(r.get(k) == v for k, v in match.items())
    ]
    best = min(peers, key=lambda r: r["median_s"], default=None)
    return _ratio(best, ours)


def summarize(rows: List[Dict[str, Any]], ref_tokens: int) -> Dict[str, Any]:
    layer = [r for r in rows if r.get("group") == "moe_layer" and r.get("routing") == "uniform"]
    largest = max((r["tokens"] for r in layer), default=None)
    ours = _find(rows, group="moe_layer", impl="geomoe", tokens=ref_tokens, routing="uniform")
    big = _find(rows, group="moe_layer", impl="geomoe", tokens=largest, routing="uniform")
    gg = _find(rows, group="grouped_gemm", impl="geomoe", tokens=ref_tokens)
    gg_cuda = _find(rows, group="grouped_gemm", impl="geomoe_cuda", tokens=ref_tokens)
    peers = [
        r
        for r in rows
        if r.get("group") == "moe_layer"
        and r.get("tokens") == ref_tokens
        and r.get("routing") == "uniform"
        and r.get("peer")
        and r.get("median_s")
    ]
    best_peer = min(peers, key=lambda r: r["median_s"], default=None)
    perm = _find(rows, group="permute", tokens=ref_tokens)
    fc1 = _find(rows, group="norm_linear", impl="geomoe", layer="fc1")
    conv = _find(rows, group="masked_dwconv", direction="forward")
    fe_s = _find(rows, group="front_end", impl="sparse", mask_ratio=0.75)
    fe_d = _find(rows, group="front_end", impl="dense", mask_ratio=0.75)
    first_batch = min((r["images"] for r in rows if r.get("group") == "train_step"), default=None)  # the summary's batch
    ts_o = _find(rows, group="train_step", impl="geomoe", images=first_batch)
    ts_p = _find(rows, group="train_step", impl="published", images=first_batch)
    ra = _find(rows, group="rotated_roi_align", impl="geomoe", direction="forward")
    return {
        "reference_tokens": ref_tokens,
        "largest_tokens": largest,
        "moe_layer_fwdbwd_tflops": big.get("tflops") if big else None,
        "moe_layer_speedup_vs_loop": _ratio(
            _find(rows, group="moe_layer", impl="loop", tokens=ref_tokens, routing="uniform"), ours
        ),
        "moe_layer_speedup_vs_grouped_mm": _ratio(
            _find(rows, group="moe_layer", impl="grouped_mm", tokens=ref_tokens, routing="uniform"), ours
        ),
        "moe_layer_speedup_vs_best_peer": _ratio(best_peer, ours),
        "moe_layer_best_peer": best_peer.get("impl") if best_peer else None,
        "moe_layer_fwd_speedup_vs_best_peer": _vs_best_peer(rows, "moe_layer_fwd", "fwd"),
        "llm_layer_fwdbwd_speedup_vs_best_peer": _vs_best_peer(rows, "moe_layer_llm", "fwdbwd"),
        "llm_layer_fwd_speedup_vs_best_peer": _vs_best_peer(rows, "moe_layer_llm", "fwd"),
        "llm_decode_8_tokens_speedup_vs_best_peer": _vs_best_peer(rows, "moe_layer_decode", "fwd", tokens=8),
        "grouped_gemm_fraction_of_mm": gg.get("fraction_of_mm") if gg else None,
        "cuda_grouped_gemm_fraction_of_mm": gg_cuda.get("fraction_of_mm") if gg_cuda else None,
        "permute_fraction_of_copy": perm.get("fraction_of_copy") if perm else None,
        "front_end_speedup_vs_dense": _ratio(fe_d, fe_s),
        "norm_linear_fc1_fraction_of_mm": fc1.get("fraction_of_mm") if fc1 else None,
        "norm_linear_fc1_speedup_vs_torch": _ratio(_find(rows, group="norm_linear", impl="torch", layer="fc1"), fc1),
        "masked_dwconv_fraction_of_copy": conv.get("fraction_of_copy") if conv else None,
        "front_end_peak_memory_ratio_dense_over_sparse": (fe_d["peak_memory_bytes"] / fe_s["peak_memory_bytes"])
        if fe_s and fe_d and fe_s.get("peak_memory_bytes")
        else None,
        "train_step_speedup_vs_original": _ratio(ts_p, ts_o),
        "train_step_speedup_vs_dense_front_end": _ratio(
            _find(rows, group="train_step", impl="geomoe_dense", images=first_batch), ts_o
        ),
        "train_step_images_per_s": ts_o.get("images_per_s") if ts_o else None,
        "rotated_iou_speedup_vs_torch": _ratio(
            _find(rows, group="rotated_iou", impl="torch"), _find(rows, group="rotated_iou", impl="geomoe")
        ),
        "rotated_nms_speedup_vs_torch": _ratio(
            _find(rows, group="rotated_nms", impl="torch", threshold=0.8),
            _find(rows, group="rotated_nms", impl="geomoe", threshold=0.8),
        ),
        "rotated_roi_align_fraction_of_copy": ra.get("fraction_of_copy") if ra else None,
    }


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def default_out() -> str:
    """runs/benchmarks/<UTC time>: a run folder, outside the tracked benchmarks/results/."""
    return os.path.join(ROOT, "runs", "benchmarks", dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S"))


def free_stem(out: str, name: str) -> str:
    """out/name, or out/name-2, -3, ... where files of that name exist: never overwrite a run."""
    stem, n = os.path.join(out, name), 1
    while any(os.path.exists(stem + ext) for ext in (".json", ".md")):
        n += 1
        stem = os.path.join(out, f"{name}-{n}")
    return stem


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default=None, help="folder for the results (default: runs/benchmarks/<UTC time>)")
    ap.add_argument("-k", default=None, help="pytest -k expression to run a subset")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds: benchmarks that would start later are skipped (headline figures run first)",
    )
    args = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    from benchmarks import common, report

    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "raw.json")
        unsupported = os.path.join(tmp, "unsupported.jsonl")
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            os.path.join(ROOT, "benchmarks"),
            f"--benchmark-json={raw}",
            "-p",
            "no:cacheprovider",
        ]
        if args.k:
            cmd += ["-k", args.k]
        env = dict(os.environ, **{common.UNSUPPORTED_ENV: unsupported})
        for name in [n for n in env if n.startswith("PYTEST_XDIST_")]:
            del env[name]  # a run started from a pytest-xdist worker (the tests) is its own session, timed
        if args.budget is not None:
            env["GEOMOE_BENCH_DEADLINE"] = str(time.time() + args.budget)
        proc = subprocess.run(cmd, cwd=ROOT, env=env)
        if not os.path.exists(raw):
            print("benchmarks produced no results", file=sys.stderr)
            return proc.returncode or 1
        data = json.load(open(raw))
        skipped = [json.loads(line) for line in open(unsupported)] if os.path.exists(unsupported) else []
    machine = data["machine_info"].get("geomoe", {})
    rows = [_row(b) for b in data["benchmarks"]]
    rows += [{**r, "median_s": None} for r in skipped]  # could not run: the reason, no time
    smoke = machine.get("mode") == "smoke"
    card = "cpu" if machine.get("mode") != "gpu" else _slug(machine.get("card", "gpu").replace("NVIDIA", ""))
    result = {
        "summary": {
            "mode": machine.get("mode"),
            **summarize(rows, common.reference_tokens()),
            "card": machine.get("card"),
            "torch": machine.get("torch"),
            "cuda": machine.get("cuda"),
            "triton": machine.get("triton"),
            "commit": machine.get("commit"),
        },
        "machine": machine,
        "datetime": data.get("datetime"),
        "rows": rows,
    }
    out = args.out or default_out()
    os.makedirs(out, exist_ok=True)
    name = f"{dt.date.today().isoformat()}-{card}{'-smoke' if smoke else ''}-{machine.get('commit', 'unknown')}"
    stem = free_stem(out, name)
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(report.markdown(result))
    if not args.no_plots:
        report.plots(result, stem)
    print("\n".join(["", *([report.SMOKE_NOTE] if smoke else []), *report.summary_table(result), ""]))
    print(f"wrote {stem}.json and {stem}.md")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
