"""The benchmark's measuring tools: alternating timing, compile counting, compiled memory."""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Callable


def time_alternating(variants: dict[str, tuple[Callable, Any]], batches: dict[str, Any], repeats: int, steps: int,
                     warmup: int) -> dict[str, list[float]]:
    """Seconds per step of each variant: ``repeats`` samples of ``steps`` steps each.

    ``variants`` maps a name to ``(step_fn, state)``; ``step_fn(state, batch)
    -> (state, metrics)`` may donate ``state``. Variants are timed in turn
    within every repetition, each ending with ``block_until_ready``, in the
    order given in even repetitions and in reverse in odd ones (A B C, C B A,
    A B C, ...), so that each variant of a pair comes first equally often and a
    steady drift of the machine falls on both sides of a ratio alike. Sample i of
    every variant comes from repetition i (``stats.ratio`` pairs them).
    """
    import jax

    states = {name: state for name, (_, state) in variants.items()}

    def run(name, n):
        fn, state = variants[name][0], states[name]
        start = time.perf_counter()
        for _ in range(n):
            state, metrics = fn(state, batches[name])
        jax.block_until_ready((state, metrics))
        states[name] = state
        return (time.perf_counter() - start) / n

    for name in variants:
        run(name, warmup)
    samples = {name: [] for name in variants}
    for r in range(repeats):
        for name in list(variants)[::-1 if r % 2 else 1]:
            samples[name].append(run(name, steps))
    return samples


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    """The median of each variant's per-repetition samples (``time_alternating``'s output)."""
    return {k: statistics.median(v) for k, v in samples.items()}


# The event that jax.monitoring records once per XLA executable jax builds, with its duration and the
# program's name as ``fun_name`` (jax's own compile-time metric; an executable loaded from the persistent
# compilation cache records none).
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def counting_compiles():
    """Collect jax's backend compilations (one event per XLA executable built).

    jax's persistent compilation cache is off inside the block (and restored
    after it): an executable loaded from that cache is not compiled, so it
    sends no event, and a program that an earlier process or run had built
    would be counted 0 times."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    events: list[str] = []

    def listener(event, duration, **kwargs):
        if event == BACKEND_COMPILE_EVENT:
            events.append(kwargs.get("fun_name", "?"))

    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # jax decides once per process whether the cache is used; ask again
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
        jax.config.update("jax_enable_compilation_cache", enabled)
        compilation_cache.reset_cache()


def compile_step(step_fn, state, batch):
    """The XLA executable of ``step_fn`` (the raw ``.compiled`` of a ``shard_map_step``) at these inputs."""
    return getattr(step_fn, "compiled", step_fn).lower(state, batch).compile()


def compiled_memory(step_fn, state, batch, executable=None) -> dict:
    """XLA's memory analysis of the compiled step (``executable`` when given), per device, in bytes."""
    try:
        stats = (executable or compile_step(step_fn, state, batch)).memory_analysis()
    except Exception as err:  # a backend without memory analysis
        return {"total": None, "error": f"{type(err).__name__}: {err}"[:200]}
    if stats is None:
        return {"total": None}
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes")
    row = {f.replace("_size_in_bytes", ""): int(getattr(stats, f)) for f in fields}
    row["total"] = row["argument"] + row["output"] - row["alias"] + row["temp"]
    return row
