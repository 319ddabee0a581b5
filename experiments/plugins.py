"""Schedules from a user's own module: ``--schedule PACKAGE.MODULE:FUNCTION``.

The factory is imported by name (the module must be importable: on
``PYTHONPATH``, installed, or under the working directory) and called with
three keyword arguments,

    factory(total_steps=T, avg_period=p, lr_schedule=gamma) -> adpsgd_jax.schedules.Schedule

where ``gamma`` maps a step to the learning rate and ``p`` is the budget
(``--avg-period``: the run may average about T / p times). The schedule it
returns is traced once with ``jax.eval_shape`` (nothing is compiled) so
that a broken schedule is refused in one line before the run starts, like
any other bad flag. ``docs/custom_schedule.md`` works through an example.
"""

from __future__ import annotations

import importlib
import re
from typing import Callable

from experiments.config import ConfigError
from experiments.names import PLUGIN_FORM

def _said(err: Exception) -> str:
    """An exception in one line: its type and the first line of its message."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


_SPEC = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


def load(spec: str, flag: str = "--schedule") -> Callable:
    """The factory named by ``spec`` (``PACKAGE.MODULE:FUNCTION``), imported;
    ConfigError naming ``flag`` when it is malformed, cannot be imported or is not callable."""
    if not _SPEC.fullmatch(spec):
        raise ConfigError(f"{flag} {spec!r}: a schedule of your own is named {PLUGIN_FORM} "
                          "(e.g. my_schedules:linear_ramp)")
    module_name, name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # the user's module may fail in any way while it is imported
        raise ConfigError(f"{flag} {spec!r}: cannot import {module_name} ({_said(err)}); it must be "
                          "importable from the working directory or PYTHONPATH") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ConfigError(f"{flag} {spec!r}: {module_name} has no function {name}")
    return factory


def build(spec: str, *, total_steps: int, avg_period: int, lr_schedule: Callable):
    """``factory(total_steps=, avg_period=, lr_schedule=)`` of ``spec``, checked to be a ``Schedule``
    whose ``init``, ``should_sync`` and ``update`` trace to scalars of the right kinds (ConfigError otherwise).

    Called once the run's steps are known, from a ``Config`` that no longer says which flag named the
    schedule: the messages name both."""
    flag = "--schedule / --compare"
    import jax
    import jax.numpy as jnp

    from adpsgd_jax.schedules import Schedule

    factory = load(spec, flag)
    try:
        schedule = factory(total_steps=total_steps, avg_period=avg_period, lr_schedule=lr_schedule)
    except Exception as err:  # a factory's own refusal of its arguments
        raise ConfigError(f"{flag} {spec}: the factory raised {_said(err)}") from None
    if not isinstance(schedule, Schedule):
        raise ConfigError(f"{flag} {spec}: the factory returned {type(schedule).__name__}, "
                          "not an adpsgd_jax.schedules.Schedule")
    step, scalar = jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.float32)
    try:
        state = jax.eval_shape(schedule.init)
        flag_shape = jax.eval_shape(schedule.should_sync, state, step)
        updated = jax.eval_shape(schedule.update, state, step, scalar, scalar)
    except Exception as err:  # tracing the user's functions
        raise ConfigError(f"{flag} {spec}: the schedule does not trace ({_said(err)})") from None
    if flag_shape.shape != () or flag_shape.dtype != jnp.bool_:
        raise ConfigError(f"{flag} {spec}: should_sync must return a bool scalar, got {flag_shape.dtype}"
                          f"{list(flag_shape.shape)}")
    if jax.tree.structure(updated) != jax.tree.structure(state) or not hasattr(state, "period"):
        raise ConfigError(f"{flag} {spec}: init must return a state with a 'period' field (the period in "
                          "force, int32) and update must return a state of the same structure")
    return schedule
