"""How many CPUs this process may really use, and the thread layout that follows.

`usable_cpus` reads the CPU affinity mask and the cgroup CPU quota (a container limited
to 2 CPUs on a 64-core host must not start 64 threads). `choose_layout` is a pure rule
over single-stream speeds measured at 1, 2, 4, ... threads per batch:

- give a batch more threads only while doubling them still speeds one stream up by at
  least `MIN_DOUBLING_GAIN`. The doubling costs a worker, and under concurrent load a
  second worker nearly doubles throughput, so a thread must pay for itself: 1.5x. (A 135M
  model on 2 cores gains 0.9x on an AMD EPYC and 1.24-1.31x on an Intel Xeon, where a
  threshold of 1.3 flapped between measurements; larger models gain ~1.8x per doubling
  up to several threads.)
- spend the remaining CPUs on parallel batches (workers): under concurrent load two
  workers of one thread beat one of two (docs/FINDINGS.md).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

MIN_DOUBLING_GAIN = 1.5
CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """min(CPUs in the affinity mask, the cgroup quota rounded up), at least 1."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs the cgroup may use (quota / period), or None when unlimited or unknown."""
    try:  # cgroup v2: "max 100000" or "200000 100000"
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us


def intra_candidates(cpus: int) -> list[int]:
    """1, 2, 4, ... up to `cpus`."""
    counts = [1]
    while counts[-1] * 2 <= cpus:
        counts.append(counts[-1] * 2)
    return counts


def choose_layout(
    cpus: int, single_speed: Mapping[int, float], min_gain: float = MIN_DOUBLING_GAIN
) -> tuple[int, int]:
    """(inter_threads, intra_threads) from one-stream tokens/s measured per intra count;
    a doubling is taken when it speeds one stream up by `min_gain` at least."""
    intra = 1
    for threads in intra_candidates(cpus)[1:]:
        if threads not in single_speed or intra not in single_speed:
            break
        if single_speed[threads] < single_speed[intra] * min_gain:
            break
        intra = threads
    return max(1, cpus // intra), intra
