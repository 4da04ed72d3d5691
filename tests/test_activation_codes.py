"""The codes the CUDA core takes (csrc/geomoe_core.h) are the Python tables' (activations and dtypes)."""

import os
import re

import torch

from geomoe_kernels import activations, cuda

HEADER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "geomoe_core.h")


def _enum(name: str) -> dict:
    body = re.search(rf"enum class {name} : int \{{([^}}]*)\}}", open(HEADER).read())
    assert body, f"no enum class {name} in {HEADER}"
    return {k: int(v) for k, v in re.findall(r"k(\w+) = (\d+)", body.group(1))}


def test_activation_enum_mirrors_python():
    camel = {a.name.title().replace("_", ""): a.value for a in activations.Activation}
    assert _enum("Activation") == camel
    assert activations.ACTIVATIONS == ("none", "gelu", "silu", "swiglu", "swiglu_interleaved")
    assert [activations.code(n) for n in activations.ACTIVATIONS] == [0, 1, 2, 3, 4]


def test_dtype_enum_mirrors_the_wrappers():
    names = {torch.float32: "Float32", torch.float16: "Float16", torch.bfloat16: "BFloat16"}
    assert _enum("DType") == {names[dt]: code for dt, code in cuda._DTYPE.items()}
