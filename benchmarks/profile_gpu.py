"""Where the time goes: torch.profiler over the MoE layer (forward + backward, GeoMoE's shape, bf16
autocast) on each backend and over the visible-only and dense front ends, printing each run's
kernels by total device time. python -m benchmarks.profile_gpu [--tokens 15680] [--images 64]

On a CPU it profiles CPU time (useful only to check that the script runs)."""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import common as C
from geomoe import GeoMoE, random_masking


def _table(prof, rows: int) -> str:
    key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70)


def _profile(name: str, step, rows: int) -> None:
    for _ in range(3):  # warm-up: autotuning and compilation stay out of the profile
        step()
    C.sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(5):
            step()
        C.sync()
    print(f"\n===== {name} (5 steps)\n{_table(prof, rows)}", flush=True)


def moe_layer(tokens: int, backend: str, rows: int) -> None:
    moe, x, g = C.skewed_layer(tokens, "uniform")
    moe.backend = backend

    def step():
        x.grad = None
        with torch.autocast(x.device.type, dtype=x.dtype, enabled=x.device.type == "cuda"):
            y, aux, _ = moe(x)
        torch.autograd.backward([y, aux], [g, torch.ones_like(aux)])

    _profile(f"MoE layer fwd+bwd, {tokens} tokens, backend {backend}", step, rows)


def front_end(images: int, front: str, rows: int) -> None:
    model = GeoMoE().to(C.device())
    imgs = torch.randn(images, 3, model.img_size, model.img_size, device=C.device())
    keep = random_masking(images, model.grid**2, 0.75, 0.25, device=C.device()).keep
    run = model._front_end_sparse if front == "sparse" else model._front_end_dense

    def step():
        with torch.autocast(C.device().type, dtype=C.dtype(), enabled=C.device().type == "cuda"):
            x, s1, s2 = run(imgs, keep)
        (x.float().square().mean() + s1.float().square().mean() + s2.float().square().mean()).backward()

    _profile(f"front end fwd+bwd, {images} images, mask 0.75, {front}", step, rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=C.PRETRAIN_TOKENS)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--backends", default="auto,triton,cuda,torch", help="MoE layer backends to profile ('' for none)")
    ap.add_argument("--front-ends", default="sparse,dense", help="front ends to profile ('' for none)")
    args = ap.parse_args(argv)
    for backend in filter(None, args.backends.split(",")):
        try:
            moe_layer(args.tokens, backend, args.rows)
        except Exception as e:  # a backend that cannot run here says why and the rest still run
            print(f"\n===== MoE layer, backend {backend}: {type(e).__name__}: {e}", flush=True)
    for front in filter(None, args.front_ends.split(",")):
        front_end(args.images, front, args.rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
