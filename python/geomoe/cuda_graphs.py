"""--cuda-graphs: each transformer block's forward and backward replayed as CUDA graphs.

A training step of the MoE model launches a few hundred small kernels per block; on a fast GPU the
host's Python and dispatcher time between them can exceed the GPU time. `BlockGraphs` captures
every transformer block (speed.transformer_blocks: the MoE blocks of the encoder, the decoder's
blocks) once with torch.cuda.make_graphed_callables and replays the block's forward and backward
as one graph launch each. Every shape in a block is static: the routing is dropless (the grouped
GEMMs read their offsets on the device, no host sync) and the mask ratio is fixed, so a batch of
the same size always gives the same token counts.

The order, and why:
1. the first step of the process runs eagerly, each block's inputs recorded (shape, dtype, whether
   they need a gradient, and the values, for realistic routing in the capture). That step makes
   the layers' launch plans and their constant tensors (nn/_layer_plan.py keeps them alive: a
   graph holds their addresses), the backends' self-check verdicts, Triton's compilation and
   autotuning: work that synchronises with the host, which a capture forbids;
2. after that step: make_graphed_callables warms every block up again on a side stream, then
   captures the forwards in order and the backwards in reverse order into one memory pool, under
   the run's autocast with its cast cache off (a cached cast made in a capture would outlive it),
   in thread-local capture mode (the data loader's pin-memory thread goes on allocating);
   the fused gating's ticket counter of the capture stream is made before the capture, so the
   graphs hold a counter that lives as long as the process (the kernel zeroes it in place);
3. every later call of a block copies its inputs into the graph's and replays. The expert-bias
   buffers are updated in place after each optimizer step (MoEMLP._apply_bias_update), so the
   replayed router reads the new biases; a parameter or buffer replaced by another tensor, a batch
   of another shape, or gradients already in .grad before the graphed backward are errors naming
   --cuda-graphs, never a silently stale graph. A block in eval mode or without autograd runs its
   eager forward; `eager()` does the same for one step (a batch shortened by unreadable images).

Random ops inside a block (drop path; none in pretraining) use torch's default CUDA generator, which
a capture registers: each replay draws new numbers. What cannot work is refused (`refusal`,
`combination_refusal`): a CPU, FSDP2, expert parallelism, --compile, --activation-checkpointing,
--backend torch and value checks on the GPU (each message says why)."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .speed import autocast

FLAG = "--cuda-graphs"

Signature = Tuple[Tuple[Tuple[int, ...], torch.dtype, torch.device, bool], ...]


def combination_refusal(
    fsdp: bool, ep: Optional[int], expert_parallel: bool, compile: bool, checkpointing: bool, backend: str = "auto"
) -> Optional[str]:
    """Why --cuda-graphs cannot run with these other flags (one line naming both), or None."""
    if backend == "torch":
        return (
            f"arguments '{FLAG}' and '--backend torch' expected one at most, got both: the torch reference of the "
            "grouped GEMM reads each expert's token count on the host, a synchronisation a captured graph cannot "
            "hold (--backend auto, triton or cuda)"
        )
    if fsdp:
        return (
            f"arguments '{FLAG}' and '--fsdp' expected one at most, got both: FSDP2 gathers each block's parameters "
            "into new memory around its forward and backward, which a captured graph cannot follow (DDP, the "
            "default under torchrun, keeps the parameters in place)"
        )
    if expert_parallel or (ep is not None and ep > 1):
        got = "--expert-parallel" if expert_parallel else f"--ep {ep}"
        return (
            f"argument '{FLAG}' expected no expert parallelism (--ep 1), got {got}: the experts' all-to-all "
            "exchange reads each step's token counts on the host, a synchronisation a captured graph cannot hold"
        )
    if compile:
        return (
            f"arguments '{FLAG}' and '--compile' expected one at most, got both: a replayed graph would skip the "
            "compiled block's guards and recompilations (torch.compile has its own graphs: mode='reduce-overhead')"
        )
    if checkpointing:
        return (
            f"arguments '{FLAG}' and '--activation-checkpointing' expected one at most, got both: torch.utils."
            "checkpoint stashes the CUDA RNG state on the host at every call, which torch refuses during a capture"
        )
    return None


def refusal(device: torch.device, ep: int = 1) -> Optional[str]:
    """Why --cuda-graphs cannot run on this device (or with ep ranks per expert group), or None."""
    if device.type != "cuda":
        return (
            f"argument '{FLAG}' expected a CUDA device (a graph is captured from a CUDA stream), got {device.type} "
            "(--device cpu, or no GPU visible to torch)"
        )
    if ep > 1:
        return combination_refusal(False, ep, False, False, False)
    from geomoe_kernels import _checks

    if _checks.value_checks_enabled(torch.empty(0, device="meta")):  # as for any tensor off the CPU
        return (
            f"environment variable GEOMOE_CHECK_VALUES=1 (or set_value_checks(True)) cannot go with {FLAG}: the "
            "value checks read GPU tensors on the host, a synchronisation a captured graph cannot hold; unset it "
            "(the default checks CPU tensors only)"
        )
    return None


def signature(args: Sequence[Any]) -> Signature:
    """What a graph is captured for: each input's shape, dtype, device and whether it needs a gradient."""
    return tuple((tuple(a.shape), a.dtype, a.device, a.requires_grad) for a in args)


def _shown(sig: Signature) -> str:
    return ", ".join(f"{list(s)} {str(d).replace('torch.', '')}{' (grad)' if g else ''}" for s, d, _, g in sig)


class _TensorOutputs(nn.Module):
    """What make_graphed_callables captures for one block: its eager forward with only the tensor
    outputs (a dense MoE-ViT block returns (x, None, None); a graph's outputs must all be tensors),
    the block a child so that its parameters are the graph's too."""

    def __init__(self, block: nn.Module, forward: Callable):
        super().__init__()
        self.block = block
        self.eager_forward = forward
        self.layout: Optional[Tuple[bool, Tuple[bool, ...]]] = None  # (a tuple?, which outputs are None)

    def forward(self, *args: Tensor) -> Tuple[Tensor, ...]:
        out = self.eager_forward(*args)
        outs = out if isinstance(out, tuple) else (out,)
        self.layout = (isinstance(out, tuple), tuple(o is None for o in outs))
        return tuple(o for o in outs if o is not None)

    def restore(self, tensors: Sequence[Tensor]) -> Any:
        as_tuple, nones = self.layout  # type: ignore[misc]
        it = iter(tensors)
        outs = tuple(None if none else next(it) for none in nones)
        return outs if as_tuple else outs[0]


class BlockGraphs:
    """The blocks' forwards, first recording (the eager warm-up step), then after `capture()`
    replaying. `capture_fn` is torch.cuda.make_graphed_callables (tests pass a stand-in)."""

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        device: torch.device,
        precision: str,
        capture_fn: Optional[Callable] = None,
        warmup_iters: int = 3,
    ):
        if not blocks:
            raise ValueError(f"argument '{FLAG}' expected a model with transformer blocks, got none")
        self.blocks = list(blocks)
        self.device, self.precision, self.warmup_iters = device, precision, warmup_iters
        self.capture_fn = capture_fn
        self.eager_forwards = [blk.forward for blk in self.blocks]
        self.samples: List[Optional[Tuple[Tensor, ...]]] = [None] * len(self.blocks)
        self.signatures: List[Signature] = []
        self.captured = False
        self._eager = False
        for i, blk in enumerate(self.blocks):
            blk.forward = self._recording(i)  # type: ignore[method-assign]

    @contextlib.contextmanager
    def eager(self, on: bool = True) -> Iterator[None]:
        """The blocks' eager forwards while inside (on=False: no change)."""
        before, self._eager = self._eager, self._eager or on
        try:
            yield
        finally:
            self._eager = before

    def _recording(self, i: int) -> Callable:
        forward = self.eager_forwards[i]

        def record(*args: Any, **kwargs: Any) -> Any:
            if kwargs or not all(isinstance(a, Tensor) for a in args):
                raise ValueError(
                    f"argument '{FLAG}' expected transformer blocks called with tensors only, got block {i} called with "
                    f"{[type(a).__name__ for a in args]}{' and keywords ' + str(sorted(kwargs)) if kwargs else ''}"
                )
            if self.blocks[i].training and torch.is_grad_enabled() and not self._eager:
                self.samples[i] = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
            return forward(*args)

        return record

    def ready(self) -> bool:
        """Every block has run in training with autograd since the start (the warm-up is done)."""
        return not self.captured and all(s is not None for s in self.samples)

    def capture(self) -> None:
        """Capture every block's forward and backward (after an eager step: `ready()`)."""
        missing = [i for i, s in enumerate(self.samples) if s is None]
        if self.captured or missing:
            raise RuntimeError(
                f"{FLAG}: capture expected one eager training step through every block first, got "
                + ("a second capture" if self.captured else f"blocks {missing} not run yet")
            )
        samples = [s for s in self.samples if s is not None]
        adapters = [_TensorOutputs(blk, fwd) for blk, fwd in zip(self.blocks, self.eager_forwards)]
        capture_fn = self.capture_fn
        if capture_fn is None:
            capture_fn = torch.cuda.make_graphed_callables
            _prime_tickets(self.device)
        try:
            with autocast(self.precision, self.device, cache=False), _thread_local_captures():
                capture_fn(tuple(adapters), tuple(samples), num_warmup_iters=self.warmup_iters, allow_unused_input=True)
        except RuntimeError as exc:  # e.g. an op that synchronises (a reference backend's host loop)
            raise RuntimeError(
                f"{FLAG}: capturing the transformer blocks failed ({type(exc).__name__}: {str(exc).splitlines()[0]}): "
                "an op in a block synchronised with the host (an op on the torch backend, which --backend auto "
                f"takes where no kernel backend runs: `make info` says which); run without {FLAG}"
            ) from exc
        self.signatures = [signature(s) for s in samples]
        self.samples = [None] * len(self.blocks)  # the graphs hold their own copies of the inputs
        for i, (blk, adapter) in enumerate(zip(self.blocks, adapters)):
            blk.forward = self._replaying(i, adapter)  # type: ignore[method-assign]
        self.captured = True

    def _replaying(self, i: int, adapter: _TensorOutputs) -> Callable:
        blk, eager_forward, sig = self.blocks[i], self.eager_forwards[i], self.signatures[i]
        # the graph reads each parameter and buffer at its address at capture: (owner, name, tensor, address)
        held = [
            (owner, name, t, t.data_ptr())
            for owner in blk.modules()
            for name, t in list(owner._parameters.items()) + list(owner._buffers.items())
            if t is not None
        ]
        params = [t for _, _, t, _ in held if isinstance(t, nn.Parameter)]

        def no_gradients_yet(grad: Tensor) -> None:
            if any(p.grad is not None for p in params):
                raise RuntimeError(
                    f"{FLAG}: transformer block {i}'s parameters already hold gradients before its graphed backward "
                    "(gradient accumulation, or zero_grad(set_to_none=False)): the graph writes the gradients into its "
                    "own buffers, which .grad then shares, so a second backward would double them; call "
                    "optimizer.zero_grad(set_to_none=True) before every backward"
                )

        def replay(*args: Any, **kwargs: Any) -> Any:
            if self._eager or kwargs or not blk.training or not torch.is_grad_enabled():
                return eager_forward(*args, **kwargs)
            got = signature(args)
            if got != sig:
                raise RuntimeError(
                    f"{FLAG}: transformer block {i} was captured for inputs {_shown(sig)}, got {_shown(got)}: a graph "
                    "replays fixed shapes (the batch size per rank, the mask ratio's token counts)"
                )
            for owner, name, t, address in held:
                if (owner._parameters.get(name, owner._buffers.get(name)) is not t) or t.data_ptr() != address:
                    raise RuntimeError(
                        f"{FLAG}: transformer block {i}'s tensor '{name}' ({type(owner).__name__}) was replaced or moved "
                        "after the capture; the graph reads the captured one: update it in place (copy_, +=)"
                    )
            outs = adapter(*args)
            if outs and outs[0].requires_grad:
                outs[0].register_hook(no_gradients_yet)
            return adapter.restore(outs)

        return replay


@contextlib.contextmanager
def _thread_local_captures() -> Iterator[None]:
    """torch.cuda.graph captures in cudaStreamCaptureModeThreadLocal while inside. The default,
    global, makes a CUDA call that may synchronise an error in every thread during a capture: the
    data loader's pin-memory thread allocates pinned memory while the blocks are captured.
    make_graphed_callables takes no mode, so the class it captures with gets this default."""
    base = torch.cuda.graphs.graph

    class ThreadLocalGraph(base):  # type: ignore[valid-type, misc]
        def __init__(self, cuda_graph, pool=None, stream=None, capture_error_mode="thread_local", **kw):
            super().__init__(cuda_graph, pool, stream, capture_error_mode, **kw)

    saved = torch.cuda.graph, torch.cuda.graphs.graph
    torch.cuda.graph = torch.cuda.graphs.graph = ThreadLocalGraph  # type: ignore[misc]
    try:
        yield
    finally:
        torch.cuda.graph, torch.cuda.graphs.graph = saved  # type: ignore[misc]


def _prime_tickets(device: torch.device) -> None:
    """The fused gating's ticket counter of the stream make_graphed_callables captures on, made now
    (outside any capture): the graphs then hold a counter that lives as long as the process."""
    from geomoe_kernels.nn import _layer_plan

    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    graph_cls = torch.cuda.graph
    if graph_cls.default_capture_stream is None:
        graph_cls.default_capture_stream = torch.cuda.Stream(device=device)
    with torch.cuda.stream(graph_cls.default_capture_stream):
        _layer_plan._ticket(device)
