"""`geomoe pretrain --cuda-graphs` beside the same eager run (benchmarks/gpu_check.sh, step graphs).

python -m benchmarks.cuda_graphs_check --out cuda_graphs.json [--steps 40] [--batch 64] [--log-every 5]

Both runs: the tiny preset on the embedded procedural scenes, the same seed, precision and steps, in
one process (the eager run first: it also pays the kernels' compilation). Writes a JSON file: per
logged window of each run the loss and images/s; the step time of each (the windows after the
first, which holds the warm-up and, for the graphed run, the capture); the largest relative
difference of the logged losses and of the expert biases between the two runs. Exits 1 when a
loss differs by more than --tolerance (relative): the graphs would then replay something else than
the eager step (a stale input, bias or shape)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any, Dict, List


def _run(graphs: bool, args: argparse.Namespace, root: str) -> Dict[str, Any]:
    from geomoe.train import PretrainArgs, pretrain

    start = time.perf_counter()
    res = pretrain(
        PretrainArgs(
            out=os.path.join(root, "graphs" if graphs else "eager"),
            steps=args.steps,
            batch_size=args.batch,
            log_every=args.log_every,
            save_minutes=0,
            progress=False,
            tensorboard=False,
            cuda_graphs=graphs,
        )
    )
    history: List[Dict[str, Any]] = res["history"]
    later = history[1:] or history  # every window holds log_every steps (steps is a multiple of it)
    seconds = sum(args.batch * args.log_every / r["images_per_s"] for r in later)
    return {
        "wall_s": time.perf_counter() - start,
        "step_ms": 1000 * seconds / (len(later) * args.log_every),
        "windows": [{k: r[k] for k in ("step", "loss", "images_per_s", "aux", "grad_norm")} for r in history],
        "expert_bias": history[-1]["expert_bias_per_layer"],
    }


def _refused(out: str) -> int:
    from geomoe.train import PretrainArgs, pretrain

    with tempfile.TemporaryDirectory() as root:
        try:
            pretrain(PretrainArgs(out=root, steps=1, progress=False, tensorboard=False, cuda_graphs=True, device="cpu"))
        except ValueError as exc:
            if "'--cuda-graphs' expected a CUDA device" not in str(exc):
                raise
            with open(out, "w") as f:
                json.dump({"device": "cpu", "refused": str(exc)}, f, indent=1)
            print(f"no GPU: refused as it should be: {exc}")
            return 0
    print("no GPU, and --cuda-graphs was not refused")
    return 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the JSON file to write")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--tolerance", type=float, default=0.02, help="largest relative loss difference accepted")
    args = p.parse_args(argv)
    if args.steps % args.log_every or args.steps < 2 * args.log_every:
        p.error(f"argument '--steps' expected a multiple of --log-every {args.log_every}, at least two, got {args.steps}")
    import torch

    if not torch.cuda.is_available():  # a rehearsal on a CPU: the refusal is what there is to check
        return _refused(args.out)
    result: Dict[str, Any] = {"device": torch.cuda.get_device_name()}
    with tempfile.TemporaryDirectory() as root:
        eager = _run(False, args, root)
        graphed = _run(True, args, root)
    losses = [(a["loss"], b["loss"]) for a, b in zip(eager["windows"], graphed["windows"])]
    worst = max(abs(a - b) / max(abs(a), 1e-12) for a, b in losses)
    bias = max(abs(x - y) for la, lb in zip(eager["expert_bias"], graphed["expert_bias"]) for x, y in zip(la, lb))
    result.update(
        eager=eager,
        graphs=graphed,
        speedup=eager["step_ms"] / graphed["step_ms"],
        max_rel_loss_diff=worst,
        max_expert_bias_diff=bias,
        tolerance=args.tolerance,
    )
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(
        f"step {eager['step_ms']:.2f} ms eager, {graphed['step_ms']:.2f} ms with --cuda-graphs "
        f"({result['speedup']:.2f}x); loss agreement: largest relative difference {worst:.2e} over {len(losses)} "
        f"windows (tolerance {args.tolerance:g}); expert biases differ by at most {bias:.2e}"
    )
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
