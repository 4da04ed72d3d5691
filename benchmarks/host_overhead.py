"""Host overhead per step, measured on any machine: python -m benchmarks.host_overhead [--json [FILE]]

The eager MoE layer is host-bound on an H100/H200 (issue 28), and what a step costs the host does
not need a GPU to count. This runs the library's GPU code path on CPU tensors: TRITON_INTERPRET=1
makes Triton the backend `auto` picks, value checks are off and the self-check verdicts are looked
up as on a GPU (each kernel pre-marked verified), the model runs under bf16 autocast over float32
parameters, and every Triton kernel launch is replaced by a no-op that counts it (the interpreter's
launch entry point, `InterpretedFunction.run`). The torch ops are real CPU ops at reduced widths
(the layers' structure, expert counts, top-k, activation, depths and heads are kept; the counts do
not depend on the widths, and tiny widths keep their arithmetic out of the host time), on one CPU
thread.

A MoE layer's step is its forward and `torch.autograd.backward` of its outputs (y, the aux loss)
with upstream gradients made once, outside the step, as a layer inside a network receives them
(every row alike): what is counted is the layer's own work, not a loss's.

Per step (forward + backward; the train step adds the optimizer), it reports:
- custom-op calls: calls of ops in the `geomoe` torch.library namespace;
- kernel launches: ours (Triton launches) and torch's (aten ops that launch a kernel on a GPU: every
  op except views, metadata and empty allocations; copies, fills, reductions, scans, GEMMs and the
  rest counted apart);
- allocations: op outputs with new, non-empty storage (what the caching allocator hands out);
- host syncs: ops that make the host wait for the device on a GPU (`item`/`_local_scalar_dense`,
  `nonzero`, `unique`, `bincount`, boolean-mask indexing, `equal`, `tolist`/`numpy` ...);
- host time: the median over steps, launches stubbed, nothing else instrumented; and that time over
  the host time of one plain tiny torch op (`x.add_(1)` on 16 floats) measured in the same run, the
  figure that carries across machines. Not in it: Triton's own launch cost on a GPU
  (`JITFunction.run`, tens of microseconds a launch there), which the interpreter does not have.

Rows: GeoMoE's MoE layer and the LLM's (d 2048, SwiGLU 768, 128 experts, top-8 softmax, no shared
expert), ours and each peer that runs on a CPU (a peer that cannot says why); for the LLM layer also
ours with group-limited top-k (`groups_geomoe`) and with interleaved SwiGLU (`interleaved_geomoe`),
and our transformers experts backend (`hf_geomoe`, beside transformers' own `hf_*`); the front end
(stages 1-2), sparse against the dense one; one whole GeoMoE pretraining step (forward, backward,
clip, fused AdamW, fp16 autocast with a grad scaler, as bench_train_step runs it), ours against the
published implementation. --json writes the results file
(benchmarks/results/<date>-cpu-<commit>-host-overhead.json unless a path is given)."""

from __future__ import annotations

import os

if __name__ == "__main__":  # before anything imports geomoe_kernels or triton: the GPU code path on the CPU
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["GEOMOE_CHECK_VALUES"] = "0"  # the GPU's default: checks that read values are off
    os.environ["GEOMOE_SELF_CHECK"] = "1"  # looked up on every device, as on a GPU (pre-marked verified)
    os.environ.pop("GEOMOE_CUDA_EMULATE", None)

import argparse
import collections
import contextlib
import datetime
import gc
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

NAMESPACE = "geomoe"

# aten ops that launch no kernel on a GPU: allocation without initialisation, metadata, aliasing
NO_KERNEL = {
    "empty",
    "empty_strided",
    "empty_like",
    "new_empty",
    "new_empty_strided",
    "resize_",
    "set_",
    "lift_fresh",
    "is_same_size",
    "_has_compatible_shallow_copy_type",
    "sym_size",
    "sym_stride",
    "sym_numel",
    "sym_storage_offset",
    "record_stream",
    "_local_scalar_dense",  # a device-to-host copy and a wait: counted as a sync
}
# ops that make the host wait for the device (their result, or their output's size, is read on the host)
SYNC_OPS = {
    "_local_scalar_dense",
    "nonzero",
    "masked_select",
    "unique",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "unique_dim_consecutive",
    "bincount",
    "equal",
    "is_nonzero",
    "_assert_async",
}
CATEGORIES = {
    "copy": {
        "_to_copy",
        "copy_",
        "clone",
        "_copy_from",
        "_copy_from_and_resize",
        "lift_fresh_copy",
        "to",
        "contiguous",
        "reshape",
        "type_as",
    },
    "fill": {
        "zero_",
        "fill_",
        "zeros",
        "ones",
        "full",
        "zeros_like",
        "ones_like",
        "full_like",
        "new_zeros",
        "new_ones",
        "new_full",
        "scalar_tensor",
    },
    "reduction": {
        "sum",
        "mean",
        "amax",
        "amin",
        "max",
        "min",
        "prod",
        "norm",
        "linalg_vector_norm",
        "_foreach_norm",
        "any",
        "all",
        "var",
        "std",
        "var_mean",
        "argmax",
        "argmin",
        "logsumexp",
        "native_layer_norm_backward",
    },
    "scan": {"cumsum", "cumprod", "cummax", "cummin"},
    "gemm": {
        "mm",
        "bmm",
        "addmm",
        "baddbmm",
        "addbmm",
        "_grouped_mm",
        "convolution",
        "convolution_backward",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention_for_cpu_backward",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_efficient_attention_backward",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_backward",
    },
}
_CATEGORY_OF = {name: cat for cat, names in CATEGORIES.items() for name in names}


def category(op_name: str) -> str:
    return _CATEGORY_OF.get(op_name, "other")


# ---- counting --------------------------------------------------------------------------------------


class Counts:
    """What one step (or any block of code) did: see the module docstring."""

    def __init__(self) -> None:
        self.custom_ops: Dict[str, int] = collections.Counter()
        self.our_launches: Dict[str, int] = collections.Counter()
        self.torch_launches: Dict[str, int] = collections.Counter()  # aten op name -> count
        self.syncs: Dict[str, int] = collections.Counter()
        self.allocations = 0

    def summary(self) -> Dict[str, Any]:
        by_category: Dict[str, int] = collections.Counter()
        for name, n in self.torch_launches.items():
            by_category[category(name)] += n
        ours, theirs = sum(self.our_launches.values()), sum(self.torch_launches.values())
        return {
            "custom_op_calls": sum(self.custom_ops.values()),
            "launches": ours + theirs,
            "launches_ours": ours,
            "launches_torch": theirs,
            "torch_launches_by_category": dict(sorted(by_category.items())),
            "allocations": self.allocations,
            "host_syncs": sum(self.syncs.values()),
            "custom_ops": dict(sorted(self.custom_ops.items())),
            "our_kernels": dict(sorted(self.our_launches.items())),
            "torch_ops": dict(sorted(self.torch_launches.items())),
            "sync_ops": dict(sorted(self.syncs.items())),
        }


_active: Optional[Counts] = None  # where the stubbed launches count (None: not counting)


def _op_name(func) -> str:
    return func._schema.name.split("::", 1)[1]


def _tensors(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def _bool_index(func, args) -> bool:
    """aten.index / index_put with a boolean mask: the mask's nonzero, a sync."""
    if _op_name(func) not in ("index", "index_put", "index_put_", "_index_put_impl_") or len(args) < 2:
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] or ())


_BELOW_PYTHON = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)  # the tool runs CPU tensors


class CountingMode(TorchDispatchMode):
    """Counts the aten ops below autograd and autocast (so autocast's casts and the backward's ops
    are seen), the custom ops of our namespace, and the torch ops inside them."""

    def __init__(self, counts: Counts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.counts
        if func.namespace == NAMESPACE:
            c.custom_ops[_op_name(func)] += 1
            # the op's implementation below this mode's key, with the mode back on for its torch ops
            with self:
                return func.redispatch(_BELOW_PYTHON, *args, **kwargs)
        out = func(*args, **kwargs)
        name = _op_name(func)
        if name in SYNC_OPS or _bool_index(func, args):
            c.syncs[name] += 1
        outs = [t for t in _tensors(out) if t.untyped_storage().nbytes() > 0]
        aliases = [r.alias_info for r in func._schema.returns]
        if any(a is not None and a.is_write for a in aliases):  # in place or out=: a kernel, no new memory
            new, launches = [], bool(outs)
        elif any(a is not None for a in aliases):  # may return its input (a view, or `to` with nothing to do)
            # composite ops like `to`, `contiguous`, `reshape` reach this mode undecomposed inside our
            # custom ops (below autograd): a result in new memory is a copy kernel
            ins = {t.untyped_storage().data_ptr() for t in _tensors(list(args) + list(kwargs.values()))}
            new = [t for t in outs if t.untyped_storage().data_ptr() not in ins]
            launches = bool(new)
        else:
            new, launches = outs, bool(outs) and name not in NO_KERNEL
        c.allocations += len(new)
        if launches and all(t.numel() == 0 for t in outs):
            launches = False  # an op on zero elements launches nothing
        if launches:
            c.torch_launches[name] += 1
        return out


def _host_reads(c: Counts) -> List[Tuple[Any, str, Callable]]:
    """Tensor methods that read device memory on the host without an aten op of their own."""
    patched = []
    for name in ("tolist", "numpy", "__array__"):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, _real=real, _name=name, **kw):
            c.syncs[_name] += 1
            return _real(self, *a, **kw)

        patched.append((torch.Tensor, name, wrapper))
    return patched


@contextlib.contextmanager
def stubbed_launches() -> Iterator[None]:
    """Every Triton launch (under TRITON_INTERPRET=1) becomes a no-op that counts into the active
    Counts. The autotuner and the launchers' host code still run; the kernel body does not."""
    from triton.runtime.interpreter import InterpretedFunction

    real = InterpretedFunction.run

    def launch(self, *args, grid, warmup, **kwargs):
        if not warmup and _active is not None:
            _active.our_launches[self.fn.__name__] += 1

    InterpretedFunction.run = launch
    try:
        yield
    finally:
        InterpretedFunction.run = real


@contextlib.contextmanager
def counting(launches_too: bool = True) -> Iterator[Counts]:
    """Counts of everything run inside the block (Triton launches are counted only while stubbed)."""
    global _active
    c = Counts()
    patched = _host_reads(c)
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patched]
    before, _active = _active, c
    try:
        for owner, name, fn in patched:
            setattr(owner, name, fn)
        with CountingMode(c):
            yield c
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
        _active = before


def count(fn: Callable[[], object]) -> Dict[str, Any]:
    with counting() as c:
        fn()
    return c.summary()


def host_times(fn: Callable[[], object], steps: int, warmup: int = 2) -> List[float]:
    """Host seconds of each of `steps` calls of fn (nothing instrumented but the stubbed launches)."""
    for _ in range(warmup):
        fn()
    times = []
    gc.collect()
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def plain_op_seconds(calls: int = 1000, repeats: int = 9) -> float:
    """Host time of one plain tiny torch op (x.add_(1) on 16 floats), the median of `repeats` loops."""
    x = torch.zeros(16)
    per = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            x.add_(1)
        per.append((time.perf_counter() - t0) / calls)
    return statistics.median(per)


# ---- the rows --------------------------------------------------------------------------------------

# the structure of each shape at reduced widths (see the module docstring: the counts are the same at
# the real widths, the host time is what the arithmetic of the torch ops no longer hides); bf16 rows
# of 16 and 32 elements keep the 16-byte strides torch._grouped_mm wants
SMALL_WIDTHS = {"geomoe": dict(dim=32, hidden=16), "llm": dict(dim=32, hidden=16)}
TOKENS = 256
# GeoMoE's model with every depth, head count, expert count and top-k kept, the widths cut
TINY_GEOMOE = dict(img_size=64, embed_dim=(16, 32, 48), decoder_embed_dim=32)
IMAGES = 2

MOE_IMPLS = (
    "geomoe",
    "hf_geomoe",
    "reference",
    "grouped_mm",
    "loop",
    "hf_grouped_mm",
    "hf_batched_mm",
    "scattermoe",
    "megablocks",
    "sonicmoe",
)


class Unsupported(Exception):
    pass


def _prepare_self_check() -> None:
    """Every kernel's self-check verdict pre-marked verified for this device, so `auto` looks it up
    as it does on a GPU (the check itself would run the stubbed kernels and fail them)."""
    from geomoe_kernels import backend, self_check

    cpu = torch.device("cpu")
    for op in list(backend._OPS):
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            self_check._memo[self_check.key(cpu, op, "triton", dtype)] = {"status": "verified", "detail": "host_overhead"}


def moe_step(kind: str, impl: str, widths: Optional[Dict[str, int]] = None, tokens: int = TOKENS) -> Callable[[], object]:
    """One forward + backward of the MoE layer (bf16 autocast over float32 parameters, bf16 rows): the
    backward from upstream gradients of y and the aux loss made once, before the timed steps."""
    from benchmarks import common as C
    from benchmarks import peers as P
    from geomoe_kernels import MoEMLP

    s = {**C.SHAPES[kind], **(widths if widths is not None else SMALL_WIDTHS[kind])}
    torch.manual_seed(0)
    moe = MoEMLP(
        s["dim"], s["hidden"], s["experts"], s["shared"], s["top_k"], score_func=s["score_func"], activation=s["activation"]
    )
    x = torch.randn(tokens, s["dim"], dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    if impl in LLM_OPTIONS:
        if kind != "llm":
            raise Unsupported("an LLM layer's option (its row is the LLM layer's)")
        moe = MoEMLP(
            s["dim"], s["hidden"], s["experts"], s["shared"], s["top_k"], score_func=s["score_func"], activation=s["activation"],
            **LLM_OPTIONS[impl],
        )  # fmt: skip
    if impl == "reference":
        moe.backend = "torch"
        layer: torch.nn.Module = moe
    elif impl in ("geomoe", *LLM_OPTIONS):
        layer = moe
    elif impl == "hf_geomoe":
        layer = _hf_geomoe_layer(moe)
    elif impl == "grouped_mm":
        layer = C.GroupedMMLayer(moe)
    elif impl == "loop":
        if kind != "geomoe":
            raise Unsupported("the published loop is GeoMoE's layer (sigmoid routing, GELU, a shared expert)")
        layer = C.published_layer(moe)
    else:
        try:
            layer = P.make(impl, moe, tokens)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                layer(x[:8])
        except P.PeerUnavailable as e:
            raise Unsupported(str(e))
    params = [p for p in layer.parameters() if p.requires_grad]
    x3, g3 = (x.view(1, tokens, -1), g.view(1, tokens, -1)) if impl == "loop" else (x, g)

    grads: List[torch.Tensor] = [g3]  # the upstream gradients, made once (the aux loss's on the first call)

    def step():
        for t in params + [x]:
            t.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, aux, _ = layer(x3)
        if len(grads) == 1:
            grads.append(torch.ones_like(aux))
        torch.autograd.backward([y, aux], grads)

    return step


# the LLM layer with DeepSeek-V3's group-limited top-k (8 groups, 4 kept; the routing as torch ops),
# and with GPT-OSS's interleaved SwiGLU columns (fused in the expert GEMMs as swiglu_interleaved)
LLM_OPTIONS = {"groups_geomoe": dict(n_group=8, topk_group=4), "interleaved_geomoe": dict(swiglu_layout="interleaved")}


def _hf_geomoe_layer(moe) -> torch.nn.Module:
    """Our transformers experts backend ("geomoe", geomoe_kernels.integrations.transformers) on an
    experts module declared as transformers' decorator declares one (weights [E, in, out], biased,
    [gate | up] with SiLU: the fused SwiGLU), sharing the MoEMLP's weights; routed by the MoEMLP's
    router in torch as the hf_* peers are."""
    from types import SimpleNamespace

    from benchmarks.common import TorchRoutedLayer

    try:
        import geomoe_kernels.integrations.transformers  # noqa: F401  (registers "geomoe")
        from transformers.integrations.moe import use_experts_implementation
    except ImportError as e:
        raise Unsupported(f"transformers is not installed ({e})")
    gated = moe.activation == "swiglu"

    @use_experts_implementation(is_transposed=True, is_concatenated=True, has_bias=True, has_gate=gated)
    class Experts(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = moe.num_experts
            setattr(self, "gate_up_proj" if gated else "up_proj", moe.w1)
            setattr(self, "gate_up_proj_bias" if gated else "up_proj_bias", moe.b1)
            self.down_proj, self.down_proj_bias = moe.w2, moe.b2
            self.act_fn = torch.nn.SiLU() if moe.activation in ("swiglu", "silu") else torch.nn.GELU()

        def forward(self, hidden_states, top_k_index, top_k_weights):  # pragma: no cover - replaced by the decorator
            raise AssertionError

    class Layer(TorchRoutedLayer):
        def __init__(self, moe):
            super().__init__(moe)
            self.experts_module = Experts(SimpleNamespace(_experts_implementation="geomoe"))

        def experts(self, x, ids, w):
            return self.experts_module(x, ids, w)

    return Layer(moe)


def front_end_step(impl: str) -> Callable[[], object]:
    from geomoe import GeoMoE, random_masking

    torch.manual_seed(0)
    model = GeoMoE(**TINY_GEOMOE)
    imgs = torch.randn(IMAGES, 3, model.img_size, model.img_size)
    keep = random_masking(IMAGES, model.grid**2, 0.75, 0.25).keep
    run = model._front_end_sparse if impl == "geomoe" else model._front_end_dense
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x, s1, s2 = run(imgs, keep)
        (x.float().square().mean() + s1.float().square().mean() + s2.float().square().mean()).backward()

    return step


def train_step(impl: str) -> Callable[[], object]:
    from benchmarks.bench_train_step import published_step
    from benchmarks.published_geomoe import PublishedGeoMoE
    from geomoe import GeoMoE, original_state_dict

    torch.manual_seed(0)
    ours = GeoMoE(**TINY_GEOMOE)
    if impl == "geomoe":
        model: torch.nn.Module = ours
    else:
        model = PublishedGeoMoE(**TINY_GEOMOE)
        model.load_state_dict(original_state_dict(ours))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)
    scaler = torch.amp.GradScaler("cpu")
    imgs = torch.randn(IMAGES, 3, model.grid * 16, model.grid * 16)

    return published_step(model, opt, scaler, imgs, amp=True)


def cases() -> List[Tuple[str, str, str, Callable[[], Callable[[], object]]]]:
    """(row, impl, what one step is, maker of the step)."""
    out = []
    for kind, label in (("geomoe", "MoE layer, GeoMoE"), ("llm", "MoE layer, LLM")):
        for impl in MOE_IMPLS[:1] + (tuple(LLM_OPTIONS) if kind == "llm" else ()) + MOE_IMPLS[1:]:
            out.append((label, impl, f"fwd+bwd, {TOKENS} tokens", lambda kind=kind, impl=impl: moe_step(kind, impl)))
    for impl in ("geomoe", "dense"):
        out.append(("front end", impl, f"stages 1-2 fwd+bwd, {IMAGES} images, mask 0.75", lambda impl=impl: front_end_step(impl)))
    for impl in ("geomoe", "published"):
        out.append(("train step", impl, f"GeoMoE pretraining step, {IMAGES} images", lambda impl=impl: train_step(impl)))
    return out


def measure(steps: int, only: Optional[str] = None) -> Dict[str, Any]:
    """Every row; the plain op is timed again beside each row (a shared machine's load drifts), and
    each row's ratio uses its own."""
    _prepare_self_check()
    rows = []
    with stubbed_launches():
        for row, impl, what, make in cases():
            if only and only not in f"{row} {impl}":
                continue
            entry: Dict[str, Any] = {"row": row, "impl": impl, "step": what}
            try:
                step = make()
                step()  # first call: lazy imports, autotuner caches
                entry.update(count(step))
                times = host_times(step, steps)
                plain = plain_op_seconds()
                entry["host_ms"] = 1e3 * statistics.median(times)
                entry["host_ms_min"] = 1e3 * min(times)
                entry["plain_op_us"] = 1e6 * plain
                entry["plain_op_equivalents"] = entry["host_ms"] / (1e3 * plain)
            except Unsupported as e:
                entry["unsupported"] = str(e)
            rows.append(entry)
            print(_line(entry), file=sys.stderr, flush=True)
    plains = [r["plain_op_us"] for r in rows if "plain_op_us" in r]
    return {"plain_op_us": statistics.median(plains) if plains else 1e6 * plain_op_seconds(), "rows": rows}


# ---- output ----------------------------------------------------------------------------------------

HEADER = "| row | impl | custom ops | launches (ours + torch) | torch: copy / fill / reduce / scan / gemm / other | allocations | host syncs | host ms | x plain op |"


def _cats(r: Dict[str, Any]) -> str:
    c = r["torch_launches_by_category"]
    return " / ".join(str(c.get(k, 0)) for k in ("copy", "fill", "reduction", "scan", "gemm", "other"))


def _line(r: Dict[str, Any]) -> str:
    if "unsupported" in r:
        return f"| {r['row']} | {r['impl']} | cannot run here: {r['unsupported']} | | | | | | |"
    return (
        f"| {r['row']} | {r['impl']} | {r['custom_op_calls']} | {r['launches']} ({r['launches_ours']} + {r['launches_torch']}) "
        f"| {_cats(r)} | {r['allocations']} | {r['host_syncs']} | {r['host_ms']:.2f} | {r['plain_op_equivalents']:.0f} |"
    )


def table(result: Dict[str, Any]) -> str:
    lines = [HEADER, "|" + " --- |" * HEADER.count(" | ") + " --- |"]
    lines += [_line(r) for r in result["rows"]]
    lines.append(
        f"\nhost ms: the median over the steps; x plain op: that over one plain torch op (x.add_(1), 16 floats) "
        f"timed beside the row ({result['plain_op_us']:.2f} us of host time, the median over the rows)"
    )
    return "\n".join(lines)


def _commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", nargs="?", const="", default=None, metavar="FILE", help="write the results file")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per row (the median is reported)")
    ap.add_argument("--only", default=None, help="only the rows whose 'row impl' contains this text")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("host_overhead: run it as `python -m benchmarks.host_overhead` (it sets TRITON_INTERPRET=1 first)", file=sys.stderr)
        return 2
    os.environ.setdefault("GEOMOE_CACHE_DIR", tempfile.mkdtemp(prefix="geomoe-host-overhead-"))
    import triton

    torch.set_num_threads(1)  # the host's own work: no CPU thread pool spinning up for tiny ops
    result = measure(args.steps, args.only)
    commit = _commit()
    result.update(
        machine="cpu",
        commit=commit,
        date=datetime.date.today().isoformat(),
        cpu=platform.processor() or platform.machine(),
        python=platform.python_version(),
        torch=torch.__version__,
        triton=triton.__version__,
        steps=args.steps,
    )
    print(table(result))
    if args.json is not None:
        path = args.json or os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "results", f"{result['date']}-cpu-{commit}-host-overhead.json"
        )
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
