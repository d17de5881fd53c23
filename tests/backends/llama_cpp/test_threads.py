"""`threads = "auto"`: the count measured at load follows the shared doubling rule, with
llama_cpp's own bar (1.15x), and is what the library decodes with afterwards."""

from __future__ import annotations

from typing import Any

import pytest

from llm_local.backends.llama_cpp import threads


class FakeLibrary:
    """Records the thread counts set; batches are plain objects (nothing is decoded)."""

    def __init__(self) -> None:
        self.thread_settings: list[tuple[int, int]] = []

    def llama_set_n_threads(self, ctx: Any, n_threads: int, n_threads_batch: int) -> None:
        self.thread_settings.append((n_threads, n_threads_batch))

    def llama_batch_init(self, n_tokens: int, embd: int, n_seq_max: int) -> object:
        return object()

    def llama_batch_free(self, batch: object) -> None:
        pass


@pytest.mark.parametrize(
    ("speeds", "expected"),
    [
        ({1: 73.0, 2: 1.6}, 1),  # a busy second core: one thread (measured, FINDINGS)
        ({1: 50.0, 2: 73.0}, 2),  # a doubling that pays 1.46x: one context, no second worker
        ({1: 40.0, 2: 44.0}, 1),  # one that pays 1.1x: noise, not a gain
        ({1: 10.0, 2: 18.0, 4: 34.0}, 4),
    ],
)
def test_the_measured_count_is_chosen_and_set(
    monkeypatch: pytest.MonkeyPatch, speeds: dict[int, float], expected: int
) -> None:
    monkeypatch.setattr(
        threads,
        "_tokens_per_second",
        lambda lib, ctx, memory, batch, token, rows: speeds[lib.thread_settings[-1][0]],
    )
    lib = FakeLibrary()

    chosen = threads.measure_threads(lib, ctx=None, memory=None, token=1, cpus=max(speeds))

    assert chosen == expected
    probed = [count for count, _ in lib.thread_settings[:-1]]
    assert probed == sorted(speeds) * threads.PROBE_ROUNDS  # interleaved rounds
    # What decoding runs with: the count for every step of several tokens, one fewer for
    # a lone stream's one-token step.
    assert lib.thread_settings[-1] == (max(1, expected - 1), expected)


@pytest.mark.parametrize(("batch", "lone"), [(1, 1), (2, 1), (4, 3), (16, 15)])
def test_a_lone_streams_step_leaves_one_cpu_to_its_serving_path(batch: int, lone: int) -> None:
    assert threads.lone_step_threads(batch) == lone


def test_a_round_slowed_by_something_else_does_not_decide(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each count keeps its fastest round: a second thread that paid 1.46x in two rounds
    of three is chosen although its first round, disturbed, paid less than the bar."""
    rounds = {1: iter([50.0, 49.0, 51.0]), 2: iter([52.0, 73.0, 72.0])}
    monkeypatch.setattr(
        threads,
        "_tokens_per_second",
        lambda lib, ctx, memory, batch, token, rows: next(rounds[lib.thread_settings[-1][0]]),
    )
    assert threads.measure_threads(FakeLibrary(), ctx=None, memory=None, token=1, cpus=2) == 2


def test_one_cpu_measures_nothing() -> None:
    lib = FakeLibrary()
    assert threads.measure_threads(lib, ctx=None, memory=None, token=1, cpus=1) == 1
    assert lib.thread_settings == [(1, 1)]
