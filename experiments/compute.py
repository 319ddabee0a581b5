"""One worker's compute per step, measured alone: ``step_seconds(setup)``.

The time model (docs/algorithm.md, "Time model") adds modelled
communication to compute, so its compute term must contain no
communication and must be one worker's: the run's own measured step
(summary ``measured_step_s``) includes its in-process all-reduce or QSGD
all-gather, and with K workers on a device it is K workers' steps.

The probe here runs each run's own local step with one worker on one
device: the strategy ``experiments.methods.make_strategy`` builds for the
run's config (model, per-worker batch, optimizer, outer optimizer) around
the run's own schedule with its averaging gate shut (``shut``:
``should_sync`` always false, no allreduce step), so no sync happens inside
the probe, while a schedule's per-step work stays in it. For the variance
trigger (``Schedule.drift``) that is the squared distance to the anchor, the
projection on u and the pmean of the pair, a collective that is trivial with
one worker: its compute, not its communication (the time model charges the
pair's all-reduce apart, ``monitor_rounds``). Two-level runs probe one
worker, hence no in-group mean. ``allreduce`` and ``qsgd`` have no schedule:
their probe is the local step of the same model and optimizer
(``local_sgd`` with a shut ``constant`` schedule), since they do this local
arithmetic around their collective (QSGD's quantising and dequantising are
therefore not in it). CPSGD's probe and allreduce's are then one program;
the trigger's is another, with the monitor's work in it.

``step_seconds`` returns the seconds and the probe's program id (a hash of
its lowered text, summary ``compute_program``): ``results.pool_compute``
pools the probes of runs that share a program.
"""

from __future__ import annotations

import collections
import hashlib
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp

import adpsgd_jax as A
from adpsgd_jax import distributed, schedules
from experiments import methods
from experiments.setup import Setup

# The probe times single steps until it has timed BUDGET_S seconds and at least MIN_STEPS steps (ResNet-18
# on CPU, ~1 s a step: 3 steps), or MAX_STEPS steps (digits' MLP, ~0.1 ms a step: about 0.1 s).
BUDGET_S, MIN_STEPS, MAX_STEPS = 2.0, 3, 300
_NEVER = 2**30  # the period of allreduce's and qsgd's probe schedule (its gate is shut anyway)
# Compiled probes by (device, program text): runs whose probes are one program (CPSGD, allreduce and QSGD of
# one --compare: a model, a batch, an optimizer) compile it once (0.5-1 s for digits' MLP on 2 busy cores) and timed per run.
_COMPILED: collections.OrderedDict = collections.OrderedDict()
_KEEP = 4


def _compile(jitted, state, batch, device: jax.Device):
    """(``jitted`` compiled for (state, batch), its program id), reusing an identical program compiled before."""
    lowered = jitted.lower(state, batch)
    text = lowered.as_text()
    key = (device.id, text)
    if key not in _COMPILED:
        _COMPILED[key] = lowered.compile()
        while len(_COMPILED) > _KEEP:
            _COMPILED.popitem(last=False)
    _COMPILED.move_to_end(key)
    return _COMPILED[key], hashlib.sha256(text.encode()).hexdigest()[:16]


def shut(schedule: schedules.Schedule) -> schedules.Schedule:
    """``schedule`` with its averaging gate shut: never a sync, never an allreduce step; its state, its
    ``drift`` (the per-step bound and ``observe``) unchanged."""
    return schedule._replace(should_sync=lambda state, step: jnp.zeros((), bool), allreduce_step=None)


def probe_strategy(setup: Setup, loss_fn, layout) -> A.Strategy:
    """The run's local step on ``layout`` (one worker): its own strategy and schedule, the gate shut; a
    schedule-less strategy (allreduce, qsgd) gets ``local_sgd`` of its model and optimizer."""
    config = setup.config
    if setup.schedule is None:
        return A.local_sgd(loss_fn, methods.make_optimizer(config, setup.lr_fn), shut(schedules.constant(_NEVER)),
                           workers=layout)
    return methods.make_strategy(config, loss_fn, setup.lr_fn, shut(setup.schedule), layout)


class Probe:
    """The compiled local step of one worker of ``setup`` on one device (this
    process's first), from ``params`` / ``model_state`` (one worker's, e.g.
    the run's), with one per-worker batch [1, B, ...] of the run's data."""

    def __init__(self, setup: Setup, params: Any, model_state: Any, device: Optional[jax.Device] = None):
        config, device = setup.config, device or jax.local_devices()[0]
        layout = distributed.workers(1, [device])
        _, loss_fn, _ = methods.model_fns(config, setup.dataset)
        strategy = probe_strategy(setup, loss_fn, layout)
        self.state = distributed.replicate(strategy.init(params, model_state, jax.random.PRNGKey(config.seed)), layout)
        images, labels = setup.loader.batch(0, 0)  # this process's first worker's batch
        self.batch = distributed.shard_batch({"image": images[:1], "label": labels[:1]}, layout)

        def probe_step(state, batch):  # a program name of its own: compile counts of the run's step leave it out
            return strategy.step(state, batch)

        self.step, self.program = _compile(distributed.shard_map_step(probe_step, layout).compiled, self.state,
                                           self.batch, device)
        self.time(2)  # the first steps after a compilation are slow

    def time(self, steps: int) -> float:
        """Mean seconds per step over ``steps`` consecutive steps (dispatched back to back, then waited for)."""
        start = time.perf_counter()
        for _ in range(steps):
            self.state, _ = self.step(self.state, self.batch)
        jax.block_until_ready(self.state.params)
        return (time.perf_counter() - start) / steps


def step_seconds(setup: Setup, params: Any, model_state: Any) -> tuple[float, str]:
    """(seconds, program id) of one worker's local step of ``setup`` without
    communication (``Probe``): the minimum over single timed steps.

    Steps are timed one by one (dispatch to result) until ``BUDGET_S``
    seconds and ``MIN_STEPS`` steps have passed, or ``MAX_STEPS`` steps.
    The minimum is taken because on a shared machine other processes only
    ever add time: the least-contended step is the best estimate of the
    step's cost, and runs probed under different loads stay comparable,
    where a mean or median moves with the share of steps that overlap
    other work. Single steps rather than means of several: short windows
    fall between other processes' time slices more often, and with the
    state donated from step to step a step cannot start before the last
    one ends, so one step's latency is its share of a run's throughput
    (digits' MLP on 2 busy cores: minima of 97-125 us for single steps,
    112-144 us for means of 10 or 50 steps).
    """
    probe = Probe(setup, params, model_state)
    times, start = [], time.perf_counter()
    while len(times) < MAX_STEPS and (len(times) < MIN_STEPS or time.perf_counter() - start < BUDGET_S):
        times.append(probe.time(1))
    return min(times), probe.program
