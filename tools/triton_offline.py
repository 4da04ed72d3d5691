"""Compile the Triton kernels for a GPU architecture on a machine without one, and report what the
compiler reports: registers, spilled bytes, stack and shared memory per kernel and launch config,
and what the hardware will run, read from the cubin's SASS (cuobjdump -sass): the tensor-core
instruction (`mma HGMMA`: Hopper's warpgroup wgmma; `HMMA`: the mma.sync of sm_80 and later; `-`:
none, the FMA units), whether it uses the Tensor Memory Accelerator (`tma yes`: UTMALDG / UTMASTG
bulk tensor copies) and how many CTAs fit on one SM by registers, shared memory and threads.

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute but never compiles them, so it
cannot see what only the real compiler rejects (layouts, dot operand types, shared memory beyond the
card's). Here every registered Triton kernel's example launch (backend.kernel(..., example=)) runs
with CPU tensors of GeoMoE's shapes and dtypes while the Triton kernels of the modules that
registered them are replaced by recorders, so each kernel is compiled exactly as the launchers call it, in every
autotune config that the kernel's pruning ships to that launch, for the target (default sm_90);
ptxas's resource report comes from the cubin.

    python -m tools.triton_offline [--arch 90] [--first-config-only] [--op OP]   (from the repository root)

Triton here may not be the GPU machine's version: a clean compile here is evidence, not proof."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import triton
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, native_specialize_impl

_PTR = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
}
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}


def kernel_modules() -> List[str]:
    """The modules of geomoe_kernels.triton (each registers its kernels when imported)."""
    from geomoe_kernels import triton as kernels

    return kernels.modules()


def examples(ops: Optional[Sequence[str]] = None) -> List[Callable[[torch.dtype], None]]:
    """Each registered Triton kernel's example launch (of `ops` only, if given), once each (a
    family's kernels may share one)."""
    import geomoe_kernels  # noqa: F401  (registers the kernels)
    from geomoe_kernels import backend

    found: List[Callable[[torch.dtype], None]] = []
    for op, _impl, example in backend.kernels("triton"):
        if example is not None and example not in found and (ops is None or op in ops):
            found.append(example)
    return found


@dataclass
class Launch:
    name: str
    kernel: Any  # JITFunction or Autotuner
    args: Tuple
    kwargs: Dict[str, Any]


@dataclass
class Compiled:
    name: str
    launch: int  # which recorded launch (the configs of one launch share it)
    variant: str
    num_warps: int
    num_stages: int
    autotuned: bool
    registers: Optional[int] = None
    local_bytes: Optional[int] = None  # stack frame + local memory per thread: register spills
    shared_bytes: Optional[int] = None
    fits: bool = True  # shared memory within the card's
    error: Optional[str] = None
    mma: str = "-"  # HGMMA, HMMA or - (read from the SASS)
    tma: bool = False  # bulk tensor copies (UTMALDG / UTMASTG) in the SASS
    ctas_per_sm: Optional[int] = None


class _Recorder:
    def __init__(self, name: str, kernel: Any, calls: List[Launch]):
        self.name, self.kernel, self.calls = name, kernel, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(Launch(self.name, self.kernel, args, kwargs))

        return launch


@contextlib.contextmanager
def recording() -> Iterator[List[Launch]]:
    """Every Triton kernel of our modules replaced by a recorder for the duration."""
    calls: List[Launch] = []
    saved = []
    for name in kernel_modules():
        mod = importlib.import_module(name)
        for attr, value in list(vars(mod).items()):
            if isinstance(value, (JITFunction, Autotuner)) and attr.endswith("_kernel"):
                saved.append((mod, attr, value))
                setattr(mod, attr, _Recorder(attr, value, calls))
    try:
        yield calls
    finally:
        for mod, attr, value in saved:
            setattr(mod, attr, value)


def _passes(dtypes) -> List[Tuple[torch.dtype, str]]:
    """(dtype, float32 matmul precision): float32 twice, at "highest" (IEEE dots) and "high" (TF32)."""
    return [(d, "highest") for d in dtypes] + [(d, "high") for d in dtypes if d == torch.float32]


def geomoe_launches(
    dtypes=(torch.bfloat16, torch.float32), ops: Optional[Sequence[str]] = None, arch: Optional[int] = None
) -> List[Launch]:
    """Run every registered Triton kernel's example launch on CPU tensors (GeoMoE's shapes: 23
    experts, top-3, d 768, expert hidden 576; stage-1 rows of width 256; the gating at 64, 128 and
    256 experts and the expert MLP at an LLM's shape in bf16) in each of `dtypes` (float32 in full
    precision and in TF32), recording the kernel calls. ops: only those ops' kernels' examples.
    arch: also the launches that a GPU of that architecture makes where a CPU does not (_gpu_choices)."""
    saved = torch.get_float32_matmul_precision()
    try:
        return _record_launches(dtypes, ops, arch)
    finally:
        torch.set_float32_matmul_precision(saved)


GROUPED_GEMM_OPS = ("grouped_mm", "expert_mlp")


@contextlib.contextmanager
def _gpu_choices(arch: Optional[int]) -> Iterator[Tuple[Sequence[str], Sequence[torch.dtype]]]:
    """(ops, dtypes) to record again with the kernel choices a GPU of `arch` makes that CPU tensors
    do not: on sm_90 and later the grouped GEMM's forward and dgrad take the persistent TMA kernel
    (grouped_gemm_sm90, 16-bit operands) and the weight gradient the TMA one (grouped_wgrad_sm90),
    beside the pointer kernels (float32, operands TMA cannot read); none elsewhere (sm_80: no TMA)."""
    from geomoe_kernels.triton import grouped_gemm_sm90 as sm90

    if arch is None or not sm90.persistent_chosen("auto", (arch // 10, arch % 10), sm90.HAS_DESCRIPTORS):
        yield (), ()
        return
    with sm90.forced("persistent"):
        yield GROUPED_GEMM_OPS, sm90.SIXTEEN_BIT


def _record_launches(dtypes, ops: Optional[Sequence[str]] = None, arch: Optional[int] = None) -> List[Launch]:
    with recording() as calls:
        for dtype, precision in _passes(dtypes):
            torch.set_float32_matmul_precision(precision)  # float32 GEMMs: full precision, then TF32
            for example in examples(ops):
                example(dtype)
        with _gpu_choices(arch) as (gpu_ops, gpu_dtypes):
            wanted = [op for op in gpu_ops if ops is None or op in ops]
            for dtype in [d for d in dtypes if d in gpu_dtypes]:
                for example in examples(wanted) if wanted else []:
                    example(dtype)
    return calls


def _shipped_configs(kernel: Autotuner, launch: Launch) -> List[triton.Config]:
    """The configs the autotuner would try at this launch: its list after the kernel's pruning (the
    register budgets of geomoe_kernels/triton/_config.py), as Autotuner.prune_configs applies it."""
    prune = getattr(kernel, "early_config_prune", None)
    if prune is None or len(kernel.configs) == 1:
        return list(kernel.configs)
    named = dict(zip(kernel.arg_names, launch.args))
    return prune(kernel.configs, named, **launch.kwargs)


def _variants(launch: Launch, first_config_only: bool) -> List[Tuple[JITFunction, Dict, Dict, Dict, Dict]]:
    """(jit, signature, constexprs, attributes, options) for each config the launch can run with."""
    kernel = launch.kernel
    jit = kernel.fn if isinstance(kernel, Autotuner) else kernel
    kwargs = dict(launch.kwargs)
    # FP fusion on, as launches compile by default (said explicitly: Triton 3.9 warns when it is left unset)
    options = {"num_warps": kwargs.pop("num_warps", 4), "num_stages": kwargs.pop("num_stages", 3), "enable_fp_fusion": True}
    configs = (
        [
            (dict(c.kwargs), {"num_warps": c.num_warps, "num_stages": c.num_stages, "enable_fp_fusion": True})
            for c in _shipped_configs(kernel, launch)
        ]
        if isinstance(kernel, Autotuner)
        else [({}, options)]
    )
    if first_config_only:
        configs = configs[:1]
    out = []
    for meta, opts in configs:
        consts = {**kwargs, **meta}
        sig, cst, attrs = {}, {}, {}
        for i, p in enumerate(jit.params):
            if p.name in consts:
                value = consts[p.name]
            elif i < len(launch.args):
                value = launch.args[i]
            elif p.default is not inspect.Parameter.empty:
                value = p.default
            else:
                raise TypeError(f"{launch.name}: no value for argument {p.name}")
            if p.is_constexpr:
                sig[p.name], cst[(i,)] = "constexpr", value
                continue
            # as the JIT specialises at a launch: ints equal to 1 become constants, and ints and
            # pointers divisible by 16 get the divisibility hint (what makes loads vectorise)
            ty, spec = native_specialize_impl(BaseBackend, value, p.is_const, not p.do_not_specialize, True)
            sig[p.name] = ty
            if ty == "constexpr":
                cst[(i,)] = spec
            elif spec == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
        out.append((jit, sig, cst, attrs, opts))
    return out


def _resource_usage(cubin: bytes, tool: str) -> Dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, timeout=60).stdout
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {k: int(v) for k, v in found.items()}


def _sass(cubin: bytes, tool: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, timeout=120).stdout


_OPCODE = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", re.M)


def sass_units(sass: str) -> Tuple[str, bool]:
    """(mma, tma) from a kernel's SASS: mma "HGMMA" where any warpgroup MMA (wgmma) is issued, else
    "HMMA" where any mma.sync is, else "-"; tma True where a bulk tensor copy (UTMALDG, UTMASTG,
    UTMAPF: TMA through a tensor map) is."""
    ops = set(_OPCODE.findall(sass))
    mma = "HGMMA" if "HGMMA" in ops else ("HMMA" if "HMMA" in ops else "-")
    return mma, bool(ops & {"UTMALDG", "UTMASTG", "UTMAPF"})


# per SM: registers, the most resident warps, CTAs and shared memory (of which each CTA's block
# reserves 1 KB on sm_80 and later), from the CUDA occupancy tables
_SM = {
    80: dict(regs=65536, warps=64, ctas=32, smem=164 * 1024),
    86: dict(regs=65536, warps=48, ctas=16, smem=100 * 1024),
    89: dict(regs=65536, warps=48, ctas=24, smem=100 * 1024),
    90: dict(regs=65536, warps=64, ctas=32, smem=228 * 1024),
    100: dict(regs=65536, warps=64, ctas=32, smem=228 * 1024),
    120: dict(regs=65536, warps=48, ctas=32, smem=100 * 1024),
}


def ctas_per_sm(arch: int, registers: int, num_warps: int, shared_bytes: int) -> int:
    """CTAs of one kernel resident on one SM at once: the least of the register file (each warp
    takes registers in units of 256, the per-thread count rounded up to 8), the warp slots, the
    CTA slots and the shared memory (the CTA's own plus 1 KB reserved per CTA)."""
    sm = _SM.get(arch, _SM[80])
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = (sm["regs"] // per_warp) // num_warps
    by_smem = sm["smem"] // (shared_bytes + 1024)
    return max(0, min(by_regs, sm["warps"] // num_warps, sm["ctas"], by_smem))


def _cuobjdump() -> str:
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else (shutil.which("cuobjdump") or "cuobjdump")


def compile_all(
    arch: int = 90,
    first_config_only: bool = False,
    progress: Optional[Callable[[str], None]] = None,
    only: Optional[str] = None,
    dtypes=(torch.bfloat16, torch.float32),
    ops: Optional[Sequence[str]] = None,
) -> List[Compiled]:
    """only: compile just the kernels whose name contains it; ops: run only these ops' examples."""
    target = GPUTarget("cuda", arch, 32)
    tool = _cuobjdump()
    limit = SHARED_LIMIT.get(arch, 99 * 1024)
    seen, results = set(), []
    for n, launch in enumerate(geomoe_launches(dtypes, ops, arch)):
        if only and only not in launch.name:
            continue
        variants = _variants(launch, first_config_only)
        launch_key = (launch.name, tuple(sorted(variants[0][1].items())), tuple(sorted(launch.kwargs.items())))
        if launch_key in seen:
            continue
        seen.add(launch_key)
        for jit, sig, cst, attrs, opts in variants:
            names = [p.name for p in jit.params]
            variant = (
                ", ".join(f"{names[i]}={v}" for (i,), v in cst.items())
                + "; "
                + ", ".join(f"{n}:{t}" for n, t in sig.items() if t.startswith("*"))
            )
            row = Compiled(launch.name, n, variant, opts["num_warps"], opts["num_stages"], isinstance(launch.kernel, Autotuner))
            if progress:
                progress(f"{launch.name} {opts} {variant[:120]}")
            try:
                kernel = triton.compile(
                    ASTSource(fn=jit, signature=sig, constexprs=cst, attrs=attrs), target=target, options=opts
                )
                usage = _resource_usage(kernel.asm["cubin"], tool)
                row.registers = usage.get("REG")
                row.local_bytes = usage.get("STACK", 0) + usage.get("LOCAL", 0)
                row.shared_bytes = kernel.metadata.shared
                row.fits = row.shared_bytes <= limit
                row.mma, row.tma = sass_units(_sass(kernel.asm["cubin"], tool))
                row.ctas_per_sm = ctas_per_sm(arch, row.registers or 0, row.num_warps, row.shared_bytes)
            except Exception as exc:  # reported, not raised: the report lists every failure at once
                row.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
            results.append(row)
    return results


# The grouped GEMMs (forward and dgrad, weight gradient): on sm_90 each shipped config must issue
# wgmma (HGMMA). Full-precision float32 (IEEE=True) has no tensor-core form and runs on the FMA units.
# The persistent forward/dgrad and the TMA weight gradient must also copy through TMA (their tensor descriptors).
GEMM_KERNELS = ("_gmm_kernel", "_gmm_persistent_kernel", "_wgrad_kernel", "_wgrad_tma_kernel")
TMA_KERNELS = ("_gmm_persistent_kernel", "_wgrad_tma_kernel")


def needs_hgmma(row: Compiled, arch: int) -> bool:
    return arch == 90 and row.name in GEMM_KERNELS and "IEEE=True" not in row.variant.replace(" ", "").split(";")[0].split(",")


def _occ(row: Compiled) -> int:
    """The programs per SM a persistent kernel's config launches (its OCC constexpr), else 0."""
    found = re.search(r"\bOCC=(\d+)", row.variant)
    return int(found.group(1)) if found else 0


def problems(rows: List[Compiled], arch: int = 90) -> List[str]:
    """What would go wrong on the card, for the configs shipped to each launch (after pruning): a
    build that fails; a build that spills registers or has a stack (the autotuner would be free to
    pick it if it were the fastest); a persistent build whose SM holds fewer CTAs than the
    programs per SM its grid launches (OCC); on sm_90 a grouped-GEMM build without HGMMA (its tensor-core
    dots lowered to mma.sync or FMA: a fraction of Hopper's throughput); a launch with no config
    within the shared memory (the autotuner skips the ones over it, so some but not all over is fine)."""
    out = [f"{r.name} failed to compile: {r.error} [{r.variant}]" for r in rows if r.error]
    out += [
        f"{r.name} w{r.num_warps}/s{r.num_stages}: mma {r.mma}, not HGMMA, on sm_{arch} [{r.variant}]"
        for r in rows
        if r.error is None and needs_hgmma(r, arch) and r.mma != "HGMMA"
    ]
    out += [
        f"{r.name} w{r.num_warps}/s{r.num_stages}: no TMA copy in the SASS on sm_{arch} [{r.variant}]"
        for r in rows
        if r.error is None and arch >= 90 and r.name in TMA_KERNELS and not r.tma
    ]
    out += [  # a persistent kernel's grid has OCC programs per SM: each SM must hold that many CTAs
        f"{r.name} w{r.num_warps}/s{r.num_stages}: {r.ctas_per_sm} CTAs per SM for OCC={_occ(r)} programs per SM [{r.variant}]"
        for r in rows
        if r.error is None and r.ctas_per_sm is not None and r.ctas_per_sm < _occ(r)
    ]
    out += [
        f"{r.name} w{r.num_warps}/s{r.num_stages}: {r.local_bytes} bytes of local memory per thread [{r.variant}]"
        for r in rows
        if r.error is None and r.local_bytes
    ]
    by_launch: Dict[int, List[Compiled]] = {}
    for r in rows:
        by_launch.setdefault(r.launch, []).append(r)
    for group in by_launch.values():
        if not any(r.error is None and r.fits for r in group):
            r = group[0]
            out.append(f"{r.name}: no config fits sm_{arch}'s shared memory [{r.variant}]")
    return out


def report(rows: List[Compiled], arch: int) -> str:
    lines = [
        f"Triton {triton.__version__}, compiled offline for sm_{arch}: kernel, warps/stages, registers, local memory "
        "per thread (stack + spills), shared memory, CTAs per SM, the tensor-core instruction in the SASS (HGMMA, "
        "HMMA or -) and whether it copies through TMA; then the variant (constexprs; pointer types)"
    ]
    for r in rows:
        head = f"{r.name:<26} w{r.num_warps}/s{r.num_stages}"
        if r.error:
            lines.append(f"{head}  FAILED {r.error}\n    {r.variant}")
        else:
            note = "" if r.fits else f"  shared memory over sm_{arch}'s {SHARED_LIMIT.get(arch)} B: the autotuner skips it"
            lines.append(
                f"{head}  reg {r.registers:>3}  local {r.local_bytes:>5}  smem {r.shared_bytes:>6}  ctas/sm {r.ctas_per_sm:>2}"
                f"  mma {r.mma:<5}  tma {'yes' if r.tma else 'no'}{note}\n    {r.variant}"
            )
    found = problems(rows, arch)
    spilling = sum(bool(r.local_bytes) for r in rows if r.error is None)
    lines.append(
        f"{len(rows)} kernel builds in {len({r.launch for r in rows})} launches: {sum(r.error is not None for r in rows)} "
        f"failed, {spilling} with local memory (spills), max registers {max((r.registers or 0) for r in rows)}; "
        f"{len(found)} problems" + "".join(f"\n  {p}" for p in found)
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--first-config-only", action="store_true")
    ap.add_argument("--only", default=None, help="compile only the kernels whose name contains this")
    ap.add_argument("--op", action="append", default=None, help="run only this op's example launches (repeatable)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    progress = None if args.quiet else (lambda s: print("compiling", s, file=sys.stderr, flush=True))
    rows = compile_all(args.arch, args.first_config_only, progress, args.only, ops=args.op)
    print(report(rows, args.arch))
    return 1 if problems(rows, args.arch) else 0


if __name__ == "__main__":
    sys.exit(main())
