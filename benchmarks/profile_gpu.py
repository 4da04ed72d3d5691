"""Where the time goes: torch.profiler over the MoE layer (forward + backward, GeoMoE's shape, bf16
autocast) on each backend and over the visible-only and dense front ends, printing each run's
kernels by total device time. python -m benchmarks.profile_gpu [--tokens 15680] [--images 64]
--host: where the host's time goes instead (the eager layer is host-bound on an H100/H200): each
piece of one grouped GEMM call timed alone (enqueue time per call, no sync inside), then cProfile
over the layer's eager steps, sorted by self time.

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


def _host_us(fn, calls: int = 200) -> str:
    """Host time per call (launches only queue: nothing inside waits for the device), and the wall
    time per call including the device's work."""
    import time

    for _ in range(3):
        fn()
    C.sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    C.sync()
    t2 = time.perf_counter()
    return f"host {1e6 * (t1 - t0) / calls:8.1f} us/call   wall {1e6 * (t2 - t0) / calls:8.1f} us/call"


def host_overhead(tokens: int, rows: int) -> None:
    """The pieces of one up-projection grouped GEMM (the op, its launch alone, the block schedule,
    a plain torch op for scale), then cProfile of the eager layer."""
    import cProfile
    import io
    import pstats

    from geomoe_kernels import kernel_recipes as recipe
    from geomoe_kernels.ops import grouped_mm, permute, route

    moe, x, g = C.skewed_layer(tokens, "uniform")
    s = C.layer_shape()
    ids = torch.randint(0, s["experts"], (tokens, s["top_k"]), device=C.device())
    r2f, f2r, offsets = route(ids, s["experts"])
    a = permute(x.detach(), r2f, f2r, s["top_k"])
    w = torch.randn(s["experts"], s["dim"], s["hidden"], device=C.device(), dtype=C.dtype())
    b = torch.zeros(s["experts"], s["hidden"], device=C.device(), dtype=C.dtype())
    pieces = {"op grouped_mm (gelu)": lambda: grouped_mm(a, w, offsets, b, "gelu")}
    if C.device().type == "cuda":
        from geomoe_kernels.triton import grouped_gemm as tg

        M = a.shape[0]
        sched = recipe.block_schedule(offsets, M, tg.block_m(a.dtype))
        out = torch.empty(M, s["hidden"], device=a.device, dtype=a.dtype)
        pre = torch.empty_like(out)
        pieces["Triton launch alone"] = lambda: tg.KERNELS.forward(a, w, offsets, sched, b, "gelu", None, 1, out, pre)
        # the schedule tensors every GEMM call built until the kernels found their blocks themselves (now
        # only the reference builds them)
        pieces["block schedule tensors"] = lambda: recipe.block_schedule(offsets, M, tg.block_m(a.dtype)).expert
    pieces["route"] = lambda: route(ids, s["experts"])
    pieces["torch add (scale)"] = lambda: a.add(1)
    print(f"\n===== host time per call, {tokens} tokens", flush=True)
    for name, fn in pieces.items():
        try:
            print(f"  {name:24s} {_host_us(fn)}", flush=True)
        except Exception as e:  # noqa: BLE001 - a piece that cannot run here says why
            print(f"  {name:24s} {type(e).__name__}: {e}", flush=True)

    def step():
        x.grad = None
        with torch.autocast(x.device.type, dtype=x.dtype, enabled=x.device.type == "cuda"):
            y, aux, _ = moe(x)
        torch.autograd.backward([y, aux], [g, torch.ones_like(aux)])

    print(f"  {'MoE layer fwd+bwd':24s} {_host_us(step, 20)}", flush=True)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(20):
        step()
    C.sync()
    prof.disable()
    for order in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats(order).print_stats(rows)
        print(f"\n===== cProfile of 20 eager layer steps, by {order}\n{buf.getvalue()}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=C.PRETRAIN_TOKENS)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--backends", default="auto,triton,cuda,torch", help="MoE layer backends to profile ('' for none)")
    ap.add_argument("--front-ends", default="sparse,dense", help="front ends to profile ('' for none)")
    ap.add_argument("--host", action="store_true", help="where the host's time goes (see above), then stop")
    args = ap.parse_args(argv)
    if args.host:
        host_overhead(args.tokens, args.rows)
        return 0
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
