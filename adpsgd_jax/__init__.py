"""adpsgd_jax: adaptive periodic parameter averaging and its baselines in JAX.

Modules: ``schedules`` (when to average), ``averaging`` (``local_sgd``,
periodic parameter averaging; ``streaming`` and ``fragments``, its
one-fragment-per-sync option), ``gradient_mean`` (``allreduce`` and ``qsgd``,
a gradient mean every step), ``evaluation`` (the eval step), ``state`` (the
train state, the step's metrics and the ``Strategy`` pair), ``step`` (what
every train step is made of), ``collectives`` (tree means, variance, QSGD),
``distributed`` (meshes, replication, the wrappers that map a step over
devices), ``loops`` (how the workers sharing a device run: vmap, map,
unrolled), ``comm`` (exact byte accounting inside the step), ``timemodel``
(turning counted bytes into seconds; pure Python) and ``limits``.

Submodules load on first use, so ``import adpsgd_jax.limits`` (or
``timemodel``) does not start jax: a command line can validate its flags and
set the CPU device count first.
"""

import importlib

_SUBMODULES = ("averaging", "collectives", "comm", "distributed", "evaluation", "fragments", "gradient_mean", "limits",
               "loops", "schedules", "state", "step", "streaming", "timemodel")
# The strategies and the train state, re-exported from the modules that define them.
_EXPORTS = {"StepMetrics": "state", "Strategy": "state", "TrainState": "state", "local_sgd": "averaging",
           "allreduce": "gradient_mean", "qsgd": "gradient_mean", "make_eval_step": "evaluation"}

__all__ = list(_SUBMODULES + tuple(_EXPORTS))
__version__ = "0.1.0"


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"adpsgd_jax.{name}")
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"adpsgd_jax.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'adpsgd_jax' has no attribute {name!r}")


def __dir__():
    return sorted(__all__ + ["__version__"])
