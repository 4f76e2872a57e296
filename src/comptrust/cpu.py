"""How many CPU threads comptrust's own work uses (torch in the HF engine, a llama.cpp server, its quantizer)."""

from __future__ import annotations

import os


def cpu_threads() -> int:
    """OMP_NUM_THREADS when it is set to a positive number, else every core this process may run on.

    Why OMP_NUM_THREADS wins: it is how a caller hands out shares of a small machine (the test suite gives each of its
    two pytest-xdist workers one core; their CLI subprocesses inherit it). Setting torch to all cores regardless put
    2 x 2 threads on 2 cores, and every OpenMP barrier then waits for a descheduled thread. The affinity mask rather
    than os.cpu_count(): a process pinned to some cores (taskset, a container's cpuset) should not start more
    threads than it has cores.
    """
    raw = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if raw.isdigit() and int(raw) > 0:
        return int(raw)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1
