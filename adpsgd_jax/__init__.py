"""adpsgd_jax: adaptive periodic parameter averaging and its baselines in JAX.

Modules: ``schedules`` (when to average), ``step`` (train state and the pure
train / eval steps of each strategy), ``collectives`` (tree means, variance,
QSGD), ``distributed`` (meshes, replication, the wrappers that map a step over
devices), ``loops`` (how the workers sharing a device run: vmap, map,
unrolled), ``comm`` (exact byte accounting inside the step), ``timemodel``
(turning counted bytes into seconds; pure Python) and ``limits``.

Submodules load on first use, so ``import adpsgd_jax.limits`` (or
``timemodel``) does not start jax: a command line can validate its flags and
set the CPU device count first.
"""

import importlib

_SUBMODULES = ("collectives", "comm", "distributed", "limits", "loops", "schedules", "step", "timemodel")
_FROM_STEP = ("StepMetrics", "Strategy", "TrainState", "allreduce", "local_sgd", "make_eval_step", "qsgd")

__all__ = list(_SUBMODULES + _FROM_STEP)
__version__ = "0.1.0"


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"adpsgd_jax.{name}")
    if name in _FROM_STEP:
        return getattr(importlib.import_module("adpsgd_jax.step"), name)
    raise AttributeError(f"module 'adpsgd_jax' has no attribute {name!r}")


def __dir__():
    return sorted(__all__ + ["__version__"])
