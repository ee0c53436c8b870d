"""The generation engine: Sequences, KV slot bookkeeping, the scheduler, the runner, the step loop."""

from .engine import Engine, GenerationStats

__all__ = ["Engine", "GenerationStats"]
