"""Peak tensor memory of one piece of work on the CPU, from the PyTorch profiler's allocation events.

PyTorch keeps no allocation statistics for the CPU (``torch.cuda.max_memory_allocated`` is CUDA's), and the
resident set is too coarse for small models (the C allocator reuses freed blocks and keeps small ones in its
heap). The profiler records every allocation and free of the CPU tensor allocator with its size; their
running sum, in time order, is the live tensor memory the work added, and its maximum is the peak.
"""

from __future__ import annotations

from collections.abc import Callable

from torch.profiler import ProfilerActivity, profile


def peak_growth_mib(work: Callable[[], object]) -> float:
    """Peak tensor memory (MiB) that ``work()`` holds above what was allocated before it."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        work()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20
