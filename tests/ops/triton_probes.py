"""Small Triton kernels that expose one @triton.jit helper of the library to a test (imported only
where Triton runs: a GPU, or the interpreter)."""

import triton
import triton.language as tl

from geomoe_kernels.triton.grouped_gemm import _block_of_expert, _interleaved_block


@triton.jit
def block_lookup(offsets, E, out_e, out_row0, BM: tl.constexpr, E_POW2: tl.constexpr):
    """(expert, first row) of row block program_id(0), as the grouped GEMM finds them."""
    e, row0 = _block_of_expert(offsets, E, tl.program_id(0), BM, E_POW2)
    tl.store(out_e + tl.program_id(0), e)
    tl.store(out_row0 + tl.program_id(0), row0)


@triton.jit
def interleaved_lookup(offsets, E, rounds, search_steps, out_e, out_row0, BM: tl.constexpr, E_POW2: tl.constexpr):
    """(expert, first row) of slot program_id(0) in the grouped GEMM's interleaved order."""
    e, row0 = _interleaved_block(offsets, E, tl.program_id(0), rounds, search_steps, BM, E_POW2)
    tl.store(out_e + tl.program_id(0), e)
    tl.store(out_row0 + tl.program_id(0), row0)
