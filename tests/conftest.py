"""Test configuration: 8 virtual CPU devices, asked for before jax's first operation."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from adpsgd_jax import distributed  # noqa: E402

distributed.set_cpu_devices(8)
jax.config.update("jax_numpy_rank_promotion", "raise")
