"""Where the engine's step time goes (exposed on /health)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class StepTiming:
    """Where the engine's step time goes. `python` is everything outside llama_decode and
    sampling: planning, batch filling, detokenizing, stop matching, hand-off."""

    n_steps: int = 0
    n_seq_steps: int = 0  # sequences summed over steps
    busy_s: float = 0.0
    decode_s: float = 0.0
    sample_s: float = 0.0

    def add_step(self, seconds: float, n_seqs: int) -> None:
        self.n_steps += 1
        self.n_seq_steps += n_seqs
        self.busy_s += seconds

    @property
    def python_s(self) -> float:
        return max(self.busy_s - self.decode_s - self.sample_s, 0.0)

    @property
    def python_us_per_step(self) -> float:
        return 1e6 * self.python_s / self.n_steps if self.n_steps else 0.0

    @property
    def python_us_per_seq(self) -> float:
        return 1e6 * self.python_s / self.n_seq_steps if self.n_seq_steps else 0.0

    @property
    def python_share(self) -> float:
        return self.python_s / self.busy_s if self.busy_s else 0.0
