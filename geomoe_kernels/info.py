"""python -m geomoe_kernels.info [--verify [--op OP ...]]: which backends run here, and why the others
do not; with --verify, also check every usable kernel backend against the reference
(geomoe_kernels.verify), of every op or of those named by --op, and exit non-zero if any fails."""

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
        from .triton import grouped_gemm_sm90

        lines.append(grouped_gemm_sm90.describe())
    except ImportError:
        lines.append("triton not installed")
    lines.append(f"CUDA core: {_core_line()}")
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
        lines += _backends_on(dev)
    return "\n".join(lines)


def _core_line() -> str:
    """What the CUDA core was built for and whether it runs here."""
    core, status = cuda.load()
    if core is None:
        return status
    where = getattr(core, "__file__", "?")
    archs = [a for a in str(getattr(core, "architectures")()).split(";") if a]
    built = ", ".join(f"PTX {a}" if a.startswith("compute_") else f"sm_{a}" for a in archs)
    if not torch.cuda.is_available():
        return f"built for {built}, no GPU here ({where})"
    why = cuda.device_reason(torch.device("cuda"))
    return f"built for {built}, " + ("runs on this GPU" if why is None else f"cannot run here: {why}") + f" ({where})"


def _backends_on(dev: torch.device) -> list:
    """One line per op: the backend `auto` takes on `dev` and why; then, once, why each other backend
    cannot run which ops."""
    order = backend.auto_order(dev)
    lines = [f"backends on {dev}: what `auto` takes for each op (it tries {', '.join(order)}, first that can run wins)"]
    not_here: dict = {}  # (backend, reason) -> ops
    for op in backend.ops():
        chosen, passed = backend.auto_choice(op, dev)
        label = {"torch": "torch (the PyTorch reference)", "cuda": "cuda" + (" (the emulated core)" if dev.type == "cpu" else "")}
        if chosen == "none":
            why = "no backend can run it here (why: below)"
        elif passed:
            why = f"{label.get(chosen, chosen)}, as {' and '.join(passed)} cannot run it here (why: below)"
        else:
            why = f"{label.get(chosen, chosen)}, the first in that order"
        lines.append(f"  {op:<22} auto -> {why}")
        reasons = {b: r for b, r in backend.available(op, dev).items() if r is not None}
        reasons.update(passed)  # and the kernels auto takes only when named
        for b, reason in sorted(reasons.items()):
            not_here.setdefault((b, reason), []).append(op)
    n = len(backend.ops())
    if not_here:
        lines.append(f"why the other backends do not run on {dev} (each reason once):")
        for (b, reason), ops_ in not_here.items():
            which = f"all {n} ops" if len(ops_) == n else ", ".join(ops_)
            lines.append(f"  {b}: {reason} ({which})")
    return lines


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--verify", action="store_true", help="check each usable backend and dtype against the reference")
    ap.add_argument("--op", action="append", default=None, help="with --verify: check only this op (repeatable)")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.op or ()) - set(backend.ops()))
    if unknown:
        ap.error(f"--op expected one of {backend.ops()}, got {unknown}")
    print(report(), flush=True)
    if not args.verify:
        return 0
    from . import verify

    print("\nverification (a small ragged case per op, forward and backward, against float64):", flush=True)
    return verify.main(args.op)


if __name__ == "__main__":
    raise SystemExit(main())
