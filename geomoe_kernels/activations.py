"""The activations the grouped GEMMs fuse, by name and by the code the kernels take. Activation is
the one table of codes: the Triton kernels take its values as constexprs, and csrc/geomoe_core.h
mirrors it as `enum class Activation` for the CUDA core (tests/test_activation_codes.py checks that
the two agree)."""

import enum


class Activation(enum.IntEnum):
    NONE = 0
    GELU = 1  # erf form (nn.GELU's default)
    SILU = 2
    SWIGLU = 3  # columns [gate | up]: silu(gate) * up, half the columns out
    SWIGLU_INTERLEAVED = 4  # SwiGLU on columns [g0, u0, g1, u1, ...] (W1's and b1's alike)


ACTIVATIONS = tuple(a.name.lower() for a in Activation)


SWIGLUS = ("swiglu", "swiglu_interleaved")  # the gated activations: two pre-activation columns an output


def code(name: str) -> int:
    """The kernels' code for an activation name ('none', 'gelu', 'silu', 'swiglu', 'swiglu_interleaved')."""
    return int(Activation[name.upper()])


def out_features(activation: str, n: int) -> int:
    """Columns after the activation for a pre-activation of n columns (SwiGLU halves them)."""
    return n // 2 if activation in SWIGLUS else n
