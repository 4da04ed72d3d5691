"""Large CPU tensors on transparent huge pages.

A MoE layer's stacked expert weights are one [E, K, N] tensor each (40 MiB at GeoMoE's size), so
their gradients are fresh 40 MiB buffers every backward. glibc serves anything above 32 MiB with its
own mmap and unmaps it on free, so each step pays the kernel's first-touch faults on 4 KiB pages:
about 9 ms per gradient on the dev machine, 0.2 s per pretraining step of the default model at batch
2, where the same bytes as 23 per-expert tensors are recycled from the heap. torch's CPU allocator can
ask for huge pages for allocations of 2 MiB and more (`THP_MEM_ALLOC_ENABLE=1`), which cuts the
first touch about 3x. torch reads that variable once, at its first CPU allocation, so it is set here,
at import, before this package allocates anything; a value the user set (`0` to opt out) is kept.
Linux only; where the kernel's THP mode is `never` the request is a no-op."""

import os
import sys

_VARIABLE = "THP_MEM_ALLOC_ENABLE"
_THRESHOLD = 2 << 20  # torch advises huge pages for allocations of at least this many bytes

if sys.platform.startswith("linux"):
    os.environ.setdefault(_VARIABLE, "1")


def huge_pages_requested() -> bool:
    """Whether torch's CPU allocator asks for huge pages in this process. torch page-aligns such
    allocations and 64-byte-aligns all others; one 64-byte-aligned block lands on a page boundary by
    chance 1 time in 64, so four are probed, alive together (distinct blocks, sizes that are no page
    multiple). False when torch allocated before the variable was set (its value is read once)."""
    import torch

    page = os.sysconf("SC_PAGE_SIZE")
    probes = [torch.empty(_THRESHOLD + 64 * (i + 1), dtype=torch.uint8) for i in range(4)]
    return all(p.data_ptr() % page == 0 for p in probes)


def kernel_mode() -> str:
    """The kernel's transparent-huge-page mode (always, madvise or never), or 'unknown'."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return "unknown"
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else "unknown"


def describe() -> str:
    """One line for `info`."""
    if not sys.platform.startswith("linux"):
        return "CPU huge pages: not used (not Linux)"
    state = "on" if huge_pages_requested() else "off"
    return (
        f"CPU huge pages for tensors >= 2 MiB: {state} ({_VARIABLE}={os.environ.get(_VARIABLE, 'unset')}, "
        f"kernel THP mode {kernel_mode()}; read once, at torch's first CPU allocation)"
    )
