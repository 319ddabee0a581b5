"""The names and limits that the CLI, the training run, the benchmarks and the
report share: each defined here once (the library's own limits, such as
QSGD's level count, in ``adpsgd_jax.limits``). Imports nothing, so flags can
be checked before jax starts.
"""

DATASETS = ("cifar10", "cifar100", "digits", "synthetic")
MODELS = ("resnet18", "vgg16", "cnn", "mlp")
LR_SCHEDULES = ("step", "cosine", "constant")
DTYPES = ("float32", "bfloat16")
WORKER_LOOPS = ("auto", "vmap", "map", "unroll")  # or a chunk size; adpsgd_jax.loops

# A method is what one run trains with: a strategy, and for ``average`` a schedule.
METHODS = {
    "allreduce": ("allreduce", None),  # full-sync SGD (gradient all-reduce every step)
    "qsgd": ("qsgd", None),
    "cpsgd": ("average", "constant"),
    "every_step": ("average", "every_step"),  # parameter averaging after every step (schedules.every_step)
    "post_local": ("average", "post_local"),
    "stagewise": ("average", "stagewise"),
    "adacomm": ("average", "adacomm"),
    "adpsgd": ("average", "adpsgd"),
    "adpsgd_trend": ("average", "adpsgd_trend"),  # ADPSGD whose plans extrapolate the growth rate's trend
    "lr_proportional": ("average", "lr_proportional"),
    "qsr": ("average", "qsr"),  # the Quadratic Synchronization Rule, budgeted unless --qsr-alpha is given
    "trigger": ("average", "trigger"),  # variance-triggered averaging (schedules.variance_trigger)
}
STRATEGIES = ("average", "allreduce", "qsgd")
SCHEDULES = tuple(sorted({s for _, s in METHODS.values() if s}))
PLUGIN_FORM = "PACKAGE.MODULE:FUNCTION"  # a user's schedule factory (experiments/plugins.py)


def is_plugin(method: str) -> bool:
    """Whether ``method`` names a user's schedule factory, ``PACKAGE.MODULE:FUNCTION``, rather than a
    method of ``METHODS``."""
    return ":" in method


def method_parts(method: str) -> tuple:
    """(strategy, schedule) of a method: ``METHODS[method]``; a plug-in averages with its own schedule."""
    return ("average", method) if is_plugin(method) else METHODS[method]
DEFAULT_COMPARE = ("allreduce", "cpsgd", "adpsgd", "qsgd")

# Outer optimizers applied to the averaged change at each sync, and their
# default (learning rate, momentum): nesterov is DiLoCo's outer step.
OUTER_OPTIMIZERS = ("none", "sgd", "nesterov")
OUTER_DEFAULTS = {"sgd": (1.0, 0.0), "nesterov": (0.7, 0.9)}

# Virtual CPU devices that carry the workers by default on a CPU-only machine
# (or the most of them that divides --workers): measured fastest for the
# digits demo on the project's 2-core machine (docs/scale.md).
CPU_DEVICES = 1

# Link speeds of the time model's tables (the paper's two clusters), in Gbit/s.
BANDWIDTHS_GBPS = (10, 100)
GBPS = 1e9 / 8  # bytes per second in one gigabit per second
