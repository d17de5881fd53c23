"""Usable CPUs (affinity, cgroup quota) and the thread layout rule."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llm_local.backends.shared.threads import (
    cgroup_cpu_quota,
    choose_layout,
    intra_candidates,
    usable_cpus,
)


def test_cgroup_v2_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(tmp_path) == 3.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(tmp_path) is None


def test_no_cgroup_files_means_no_quota(tmp_path: Path) -> None:
    assert cgroup_cpu_quota(tmp_path) is None


def test_usable_cpus_is_the_smaller_of_affinity_and_quota_rounded_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert usable_cpus(tmp_path) == 16
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert usable_cpus(tmp_path) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert usable_cpus(tmp_path) == 2
    (tmp_path / "cpu.max").write_text("10000 100000\n")  # a tenth of a CPU
    assert usable_cpus(tmp_path) == 1


def test_intra_candidates_double_up_to_the_cpu_count() -> None:
    assert intra_candidates(1) == [1]
    assert intra_candidates(2) == [1, 2]
    assert intra_candidates(12) == [1, 2, 4, 8]


def test_a_small_model_that_threads_do_not_speed_up_gets_one_worker_per_cpu() -> None:
    # Measured on 2-core machines: SmolLM2 one stream 23.7 tok/s on 1 thread, 21.1 on 2;
    # and 34.4 on 1, 44.9 on 2 (1.31x: not worth a worker).
    assert choose_layout(2, {1: 23.7, 2: 21.1}) == (2, 1)
    assert choose_layout(2, {1: 34.4, 2: 44.9}) == (2, 1)


def test_a_model_that_scales_gets_threads_until_doubling_stops_paying() -> None:
    speeds = {1: 4.0, 2: 7.8, 4: 14.0, 8: 16.0, 16: 16.5}
    assert choose_layout(16, speeds) == (4, 4)


def test_without_measurements_every_cpu_is_a_worker() -> None:
    assert choose_layout(8, {}) == (8, 1)
