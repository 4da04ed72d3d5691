"""Results JSON -> a markdown table and PNG plots: python -m benchmarks.report RESULTS.json [...]

Prints each file's table, and writes it beside the file (RESULTS.md) with the plots (RESULTS-*.png)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from typing import Any, Dict, List


def _fmt(v, pct=False) -> str:
    if v is None:
        return "-"
    if pct:
        return f"{100 * v:.1f} %"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _bound_us(row: Dict[str, Any], mode: str):
    """The roofline's H100 lower bound beside a GPU row at GeoMoE's shape (benchmarks/roofline.py):
    the MoE layer's routed path forward + backward, the grouped up-projection, gating, routing +
    permutation, or the combine."""
    from benchmarks import roofline

    if mode != "gpu" or not row.get("tokens"):
        return None
    if row.get("group") == "moe_layer":
        return roofline.layer_bound_us(row["tokens"])
    if row.get("group") == "grouped_gemm":
        return roofline.up_proj_bound_us(row["tokens"])
    if row.get("group") in ("gating", "permute", "unpermute"):  # permute's row runs route + permute
        kernels = ("route", "permute") if row["group"] == "permute" else (row["group"],)
        return roofline.kernels_bound_us(row["tokens"], kernels)
    return None


SMOKE_NOTE = (
    "**Smoke run**: every benchmark ran one round on tiny shapes to check that it works; its times, "
    "ratios and fractions are not measurements (each value is marked `(smoke)`)."
)


def is_smoke(result: Dict[str, Any]) -> bool:
    return result.get("machine", {}).get("mode") == "smoke" or result.get("summary", {}).get("mode") == "smoke"


def summary_table(result: Dict[str, Any]) -> List[str]:
    """The summary's rows (markdown); in a smoke run every value says so."""
    mark = " (smoke)" if is_smoke(result) else ""
    out = ["| figure | value |", "| --- | --- |"]
    for k, v in result["summary"].items():
        if k not in ("card", "torch", "cuda", "triton", "commit", "mode"):
            out.append(f"| {k} | {_fmt(v)}{mark if v is not None else ''} |")
    return out


def markdown(result: Dict[str, Any]) -> str:
    s, m = result["summary"], result["machine"]
    out = [
        f"# Benchmarks: {s.get('card')} ({m.get('mode')} mode), commit {s.get('commit')}",
        "",
        f"torch {s.get('torch')}, CUDA {s.get('cuda')}, Triton {s.get('triton')}, Python {m.get('python')}, {result.get('datetime')}",
        "",
        *([SMOKE_NOTE, ""] if is_smoke(result) else []),
        *([result["note"], ""] if result.get("note") else []),
        "## Summary",
        "",
        *summary_table(result),
    ]
    groups: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
    for r in result["rows"]:
        groups[r.get("group", "other")].append(dict(r, h100_bound_us=_bound_us(r, m.get("mode"))))
    cols = [
        "impl",
        "tokens",
        "routing",
        "passes",
        "mask_ratio",
        "images",
        "median_s",
        "tflops",
        "fraction_of_mm",
        "gbps",
        "fraction_of_copy",
        "images_per_s",
        "h100_bound_us",
        "load_max_over_mean",
        "peak_memory_bytes",
        "version",
        "unsupported",
    ]
    for group, rows in groups.items():
        present = [c for c in cols if any(r.get(c) is not None for r in rows)]
        out += ["", f"## {group}", "", "| " + " | ".join(present) + " |", "|" + " --- |" * len(present)]
        for r in rows:
            out.append("| " + " | ".join(_fmt(r.get(c), pct=c.startswith("fraction")) for c in present) + " |")
    return "\n".join(out) + "\n"


def plots(result: Dict[str, Any], stem: str) -> List[str]:
    """TFLOP/s and speedup over the published loop against tokens, one line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r.get("group") == "moe_layer" and r.get("routing") == "uniform" and r.get("median_s")]
    if not rows:
        return []
    by_impl: Dict[str, Dict[int, Dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        by_impl[r["impl"]][r["tokens"]] = r
    loop = by_impl.get("loop", {})
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for impl, pts in sorted(by_impl.items()):
        t = sorted(pts)
        a1.plot(t, [pts[x].get("tflops", 0) for x in t], marker="o", label=impl)
        if loop:
            t2 = [x for x in t if x in loop]
            a2.plot(t2, [loop[x]["median_s"] / pts[x]["median_s"] for x in t2], marker="o", label=impl)
    a1.set(xscale="log", xlabel="tokens", ylabel="TFLOP/s (fwd + bwd)", title="MoE layer throughput")
    a2.set(xscale="log", xlabel="tokens", ylabel="speedup over the published loop", title="MoE layer speedup")
    for a in (a1, a2):
        a.grid(True, alpha=0.3)
        a.legend()
    fig.suptitle(f"{result['summary'].get('card')}, commit {result['summary'].get('commit')}")
    fig.tight_layout()
    path = stem + "-moe-layer.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("results", nargs="+", metavar="RESULTS.json", help="results files written by benchmarks.run")
    ap.add_argument("--no-plots", action="store_true", help="write the table only")
    args = ap.parse_args(argv)
    for path in args.results:
        try:
            with open(path) as f:
                result = json.load(f)
            if not isinstance(result, dict) or "summary" not in result or "rows" not in result:
                raise ValueError("not a results file of benchmarks.run (no 'summary' and 'rows')")
        except (OSError, ValueError) as e:
            print(f"benchmarks.report: {path}: {e}", file=sys.stderr)
            return 2
        stem = os.path.splitext(path)[0]
        table = markdown(result)
        print(table)
        with open(stem + ".md", "w") as f:
            f.write(table)
        made = [] if args.no_plots else plots(result, stem)
        print(f"wrote {stem}.md" + "".join(f", {p}" for p in made))
    return 0


if __name__ == "__main__":
    sys.exit(main())
