"""adpsgd_jax: adaptive periodic parameter averaging and its baselines in JAX.

Modules: ``schedules`` (when to average), ``step`` (train state and pure
train / eval steps), ``collectives`` (tree means, variance, QSGD),
``distributed`` (meshes, replication, pmap / shard_map wrappers) and
``comm`` (byte counts and the all-reduce time model).
"""

from adpsgd_jax import collectives, comm, distributed, schedules
from adpsgd_jax.step import STRATEGIES, TrainState, make_eval_step, make_train_step

__all__ = [
    "STRATEGIES",
    "TrainState",
    "collectives",
    "comm",
    "distributed",
    "make_eval_step",
    "make_train_step",
    "schedules",
]
__version__ = "0.1.0"
