"""What decoding costs on this machine, measured while serving: cheap running estimates.

Two figures drive the scheduler's decisions (`grouping.plan_relief`):

- a decoding step of a batch of n items takes about ``step_base_s + step_per_item_s * n``:
  a straight line fitted to the steps the workers time (`decode.py`), by least squares
  with exponential forgetting, so it follows the machine (another process taking a core,
  a GPU instead of a CPU) within a few hundred steps;
- a prompt token costs ``prefill_token_s`` when a batch starts: the time from submitting a
  batch to its first token, over the prompt tokens it had to read (an EWMA).

Until something is measured the estimates are a prior: a small model on a small CPU
(FINDINGS: ~35 ms a step alone, ~350 prompt tokens/s per core). A GPU replaces the prior
after its first batches. The measurements come from worker threads: one lock guards them.
All workers share one model: they are replicas of the same model on the same device, and
a step timed while another worker decodes is what a step costs under load.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

# The prior, and how much weight it keeps: as much as this many observations.
PRIOR_STEP_BASE_S = 0.03
PRIOR_STEP_PER_ITEM_S = 0.003
PRIOR_PREFILL_TOKEN_S = 0.003
PRIOR_WEIGHT = 4.0
# Each observation's weight relative to the one before: ~1/(1-DECAY) observations count.
STEP_DECAY = 0.995
PREFILL_DECAY = 0.9


@dataclass(frozen=True, slots=True)
class CostEstimate:
    """A snapshot of the measured costs: a plain value the pure policy can use."""

    step_base_s: float
    step_per_item_s: float
    prefill_token_s: float
    steps_measured: int = 0
    prefills_measured: int = 0

    def step_s(self, batch_size: int) -> float:
        """Seconds per decoding step of a batch of `batch_size` items."""
        return self.step_base_s + self.step_per_item_s * max(batch_size, 1)

    def prefill_s(self, tokens: int) -> float:
        """Seconds to read `tokens` prompt tokens when a batch starts."""
        return self.prefill_token_s * max(tokens, 0)


PRIOR = CostEstimate(PRIOR_STEP_BASE_S, PRIOR_STEP_PER_ITEM_S, PRIOR_PREFILL_TOKEN_S)


class CostModel:
    """Running estimates of step and prompt-token costs (thread-safe)."""

    def __init__(self, prior: CostEstimate = PRIOR) -> None:
        self._lock = threading.Lock()
        # Weighted sums (w, n, n², t, n·t) of the least-squares fit t = a + b n over the
        # observed steps, which decay; the prior line, at n = 1 and n = 8 (two points fix
        # a line), keeps a constant small weight so that steps all of one size still
        # give a slope.
        self._sums = [0.0] * 5
        self._prior_sums = [0.0] * 5
        for size in (1, 8):
            _add(self._prior_sums, size, prior.step_s(size), PRIOR_WEIGHT / 2)
        self._prefill_token_s = prior.prefill_token_s
        self._steps = 0
        self._prefills = 0

    def observe_step(self, batch_size: int, seconds: float) -> None:
        """One decoding step of `batch_size` items took `seconds`."""
        if batch_size < 1 or not seconds > 0:
            return
        with self._lock:
            self._sums = [value * STEP_DECAY for value in self._sums]
            _add(self._sums, batch_size, seconds, 1.0)
            self._steps += 1

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """A batch read `tokens` prompt tokens in `seconds` before its first token."""
        if tokens < 1 or not seconds > 0:
            return
        with self._lock:
            self._prefill_token_s += (1 - PREFILL_DECAY) * (
                seconds / tokens - self._prefill_token_s
            )
            self._prefills += 1

    def estimate(self) -> CostEstimate:
        with self._lock:
            w, n, nn, t, nt = (a + b for a, b in zip(self._sums, self._prior_sums, strict=True))
            mean_n = n / w
            mean_t = t / w
            variance = nn / w - mean_n * mean_n
            slope = (nt / w - mean_n * mean_t) / variance if variance > 1e-12 else 0.0
            slope = max(slope, 0.0)  # a bigger batch never steps faster
            base = max(mean_t - slope * mean_n, 0.0)
            return CostEstimate(
                step_base_s=base,
                step_per_item_s=slope,
                prefill_token_s=self._prefill_token_s,
                steps_measured=self._steps,
                prefills_measured=self._prefills,
            )


def _add(sums: list[float], size: float, seconds: float, weight: float) -> None:
    sums[0] += weight
    sums[1] += weight * size
    sums[2] += weight * size * size
    sums[3] += weight * seconds
    sums[4] += weight * size * seconds
