"""One declaration per op. From one Python signature, `declare` makes the torch.library op
`geomoe::<name>` (tagged, with `backend: str = "auto"` appended), its fake, its autograd
registration and its dispatch through geomoe_kernels.backend:

    @declare(reference=_ref.route, fake=..., value_checks=...)
    def route(expert_ids: Tensor, num_experts: int) -> Tuple[Tensor, Tensor, Tensor]:
        ...  # the metadata checks (dtype, shape, device): the op and its fake both run them

    route.register_autograd(setup_context, backward)   # for a differentiable op

fake(**args) returns empty outputs of the right shapes; value_checks(**args) are the checks that
read values (the real op only: see _checks); a longer one can be given by decorating it with
@route.fake or @route.value_checks instead. Every function the declaration calls takes the op's
arguments by name, so it may list only those it reads and end with **_. The implementations (the
reference here; Triton and CUDA register theirs in their own modules) take the arguments in the
signature's order, less those named in for_backward_only (maps the op carries for its backward):
each implementation's parameters must be named so, which the registry checks when it is registered
(backend.check_signature), so they can be called by keyword too.

Everything else about an op lives beside its declaration: `verification=` names the function that
builds and runs its check against the float64 reference (geomoe_kernels.verify runs it, the
self-check too; see Verification), and a backward op names the op it differentiates
(`backward_of=`). Kernels register themselves in their own modules (backend.kernel)."""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from .. import backend as _backend

# Every geomoe op takes dense row-major inputs (its kernels index them so). Eager callers pass them
# that way; the tag makes torch.compile do the same instead of handing the op a padded layout
# (inductor pads a [T, 23] matrix to a row stride of 24 on a GPU, for example).
OP_TAGS = (getattr(torch.Tag, "needs_contiguous_strides", torch.Tag.needs_fixed_stride_order),)


@dataclass(frozen=True)
class Verification:
    """An op's verification case (a forward op's: its backward is checked through its gradients).

    check(case, backend, device, dtype) -> (float outputs and input gradients, integer outputs): runs
    the op's public function on `backend` with inputs built from `case` (geomoe_kernels.ops._case's
    fixed float64 CPU tensors, or its own from case["generator"]) moved to `device` and `dtype`; it is
    called once more with ("torch", cpu, float64) for the exact values. dtypes: the rows of the table
    (gating takes float32 logits whatever the model's dtype: one row). tolerance: the float32 bound,
    relative to max(1, max |exact|); half precision is judged against the reference's own error (see
    geomoe_kernels.verify). Built only when a check runs: nothing here is on the dispatch path."""

    check: Callable
    dtypes: Optional[Tuple[torch.dtype, ...]] = None  # None: float32, float16 and bfloat16
    tolerance: float = 1e-4


# op name -> its declaration, in declaration order (verify, self_check and the tools read it)
DECLARED: Dict[str, "Op"] = {}


class Op:
    """A declared op. Call it like the torch.library op it wraps (`.op`)."""

    def __init__(
        self,
        signature: Callable,
        reference: Callable,
        backward_of: Optional[str],
        for_backward_only: Sequence[str],
        verification: Optional[Verification] = None,
    ):
        self.name, self.__doc__ = signature.__name__.removesuffix("_op"), signature.__doc__
        self.backward_of, self.verification = backward_of, verification
        if verification is not None and backward_of is not None:
            raise ValueError(f"{self.name}: a backward op is verified through its forward's gradients, not a case of its own")
        self._check: Callable = signature
        self._value_checks: Optional[Callable] = None
        hints = typing.get_type_hints(signature)
        params = [p.replace(annotation=hints[p.name]) for p in inspect.signature(signature).parameters.values()]
        self.arg_names = [p.name for p in params]
        if set(for_backward_only) - set(self.arg_names):
            raise ValueError(f"{self.name}: for_backward_only names {sorted(for_backward_only)}, not all in the signature")
        self._impl_names = [n for n in self.arg_names if n not in for_backward_only]
        params.append(inspect.Parameter("backend", inspect.Parameter.POSITIONAL_OR_KEYWORD, default="auto", annotation=str))
        self.signature = inspect.Signature(params, return_annotation=hints["return"])
        self._all_names = [p.name for p in params]
        self._defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        self._first_default = next(i for i, p in enumerate(params) if p.default is not inspect.Parameter.empty)

        def run(*args, **kwargs):
            named, backend = self._checked(args, kwargs)
            if self._value_checks is not None:
                self._value_checks(**named)
            device = next(v.device for v in named.values() if isinstance(v, torch.Tensor))  # the first tensor's
            impl_args = {n: named[n] for n in self._impl_names}
            impl = _backend.select(self.name, backend, device, impl_args)
            # inputs arrive in the dtypes the op was called with; the implementation decides its own
            # precision. Autocast is switched off around it by the flag alone where it is on: the
            # torch.autocast context manager costs more host time per call (the eager layer is
            # host-bound on a GPU), and inside an autocast region it would do nothing more (its
            # cache is cleared when the outermost region exits).
            if not torch.is_autocast_enabled(device.type):
                return impl(*impl_args.values())
            torch.set_autocast_enabled(device.type, False)
            try:
                return impl(*impl_args.values())
            finally:
                torch.set_autocast_enabled(device.type, True)

        run.__signature__, run.__name__, run.__doc__ = self.signature, self.name, signature.__doc__  # type: ignore[attr-defined]
        self.op = torch.library.custom_op(f"geomoe::{self.name}", run, mutates_args=(), tags=OP_TAGS)
        _backend.declare(self.name, backward_of, self._impl_names)
        _backend.register(self.name, "torch", reference)
        DECLARED[self.name] = self

    def _checked(self, args, kwargs):
        """(the arguments by name, backend) after the metadata checks."""
        if kwargs or len(args) < self._first_default:  # what the dispatcher does not do: bind in full
            bound = self.signature.bind(*args, **kwargs)
            bound.apply_defaults()
            named = dict(bound.arguments)
        else:  # positional, trailing defaults left out: the fast path of every call through the op
            named = dict(zip(self._all_names, args))
            named.update((n, self._defaults[n]) for n in self._all_names[len(args) :])
        backend = named.pop("backend")
        self._check(**named)
        return named, backend

    def __call__(self, *args, **kwargs):
        return self.op(*args, **kwargs)

    def fake(self, fn: Callable) -> Callable:
        self.op.register_fake(lambda *args, **kwargs: fn(**self._checked(args, kwargs)[0]))
        return fn

    def value_checks(self, fn: Callable) -> Callable:
        self._value_checks = fn
        return fn

    def register_autograd(self, setup_context: Callable, backward: Callable) -> None:
        """setup_context(ctx, args: dict by name, output) saves what backward needs;
        backward(ctx, *grad_outputs) -> {argument name: its gradient} for the differentiable
        arguments (the rest get None). ctx.needs_grad says by name which inputs need one. An output
        that got no gradient comes to backward as None, not as a tensor of zeros (autograd's default
        would launch a fill and allocate for each: the maps and counts of gating, the saved
        pre-activations), so a backward whose first output can be unused checks for None."""
        names = self.arg_names

        def backward_by_name(ctx, *grads):
            if all(g is None for g in grads):  # no gradient reached any output
                return (None,) * (len(names) + 1)
            ctx.needs_grad = dict(zip(names, ctx.needs_input_grad))
            got = backward(ctx, *grads)
            if set(got) - set(names):
                raise RuntimeError(f"{self.name}'s backward returned gradients for {sorted(got)}, not all its arguments")
            return tuple(got.get(n) for n in names) + (None,)  # None: backend

        def setup(ctx, inputs, output):
            ctx.set_materialize_grads(False)
            setup_context(ctx, dict(zip(names + ["backend"], inputs)), output)

        torch.library.register_autograd(self.op, backward_by_name, setup_context=setup)


def declare(
    reference: Callable,
    backward_of: Optional[str] = None,
    for_backward_only: Sequence[str] = (),
    fake: Optional[Callable] = None,
    value_checks: Optional[Callable] = None,
    verification: Optional[Verification] = None,
) -> Callable[[Callable], Op]:
    """Decorates the op's signature (whose body is the metadata checks); see the module docstring.
    The op is named after the function, less a trailing "_op" (which leaves the plain name to a
    public wrapper where the op has one: one that returns fewer outputs, say). reference: the
    pure-PyTorch implementation (backend "torch"). backward_of: the op whose backward this one
    computes (it is then not listed among the ops users call). verification: the op's check against
    the reference (every op users call has one; see Verification)."""

    def make(signature: Callable) -> Op:
        op = Op(signature, reference, backward_of, for_backward_only, verification)
        if fake is not None:
            op.fake(fake)
        if value_checks is not None:
            op.value_checks(value_checks)
        return op

    return make


def contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()
