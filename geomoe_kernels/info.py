"""python -m geomoe_kernels.info [--verify]: which backends run here, and why the others do not;
with --verify, also check every usable kernel backend against the reference (geomoe_kernels.verify)
and exit non-zero if any fails."""

from __future__ import annotations

import platform

import torch

from . import backend, cpu_memory, cuda, ops, self_check  # noqa: F401  (importing ops declares them and registers the implementations)


def report() -> str:
    lines = [f"python {platform.python_version()}, torch {torch.__version__}"]
    try:
        import triton

        lines.append(
            f"triton {triton.__version__}; interpreter {'on' if backend.triton_interpreting() else 'off'} (TRITON_INTERPRET)"
        )
    except ImportError:
        lines.append("triton not installed")
    lines.append(f"CUDA core: {cuda.load()[1]}")
    variant = cuda.emulation()
    lines.append(
        f"emulated CUDA core: {cuda.load_emulated(variant or '1')[1]}; "
        + (
            f"GEOMOE_CUDA_EMULATE={variant}: the cuda backend runs CPU tensors through it"
            if variant
            else "GEOMOE_CUDA_EMULATE=1 runs CPU tensors through it"
        )
    )
    lines.append(self_check.summary())
    lines.append(
        "CPU tensors: grouped_mm and expert_mlp run one GEMM per expert that has rows, the offsets read on "
        "the host (free there; device paths never read them)"
    )
    lines.append(cpu_memory.describe())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        lines.append(f"device: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}")
        devices = [torch.device("cpu"), torch.device("cuda")]
    else:
        lines.append("device: no CUDA device; CPU only")
        devices = [torch.device("cpu")]
    for dev in devices:
        lines.append(f"backends on {dev}:")
        for op in backend.ops():
            avail = backend.available(op, dev)
            usable = [f"{b} (emulated)" if b == "cuda" and dev.type == "cpu" else b for b, why in avail.items() if why is None]
            why_not = "; ".join(f"{b}: {why}" for b, why in avail.items() if why is not None)
            lines.append(f"  {op:<22} usable: {', '.join(usable) or '-':<14} {why_not}")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--verify", action="store_true", help="check each usable backend and dtype against the reference")
    args = ap.parse_args(argv)
    print(report(), flush=True)
    if not args.verify:
        return 0
    from . import verify

    print("\nverification (a small ragged case per op, forward and backward, against float64):", flush=True)
    return verify.main()


if __name__ == "__main__":
    raise SystemExit(main())
