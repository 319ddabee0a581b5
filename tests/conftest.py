"""Test configuration: 8 virtual CPU devices, asked for before jax's first
operation, and one persistent XLA compilation cache for the whole session.

The cache (jax's own, ``jax_compilation_cache_dir``) lives in a fresh
directory made when the session starts and removed when it ends, so every
session starts from nothing and no run of the suite reads another's
programs. It is set for this process and, through the environment, for every
process a test starts (the CLI runs of the resume and multi-process tests,
the notebooks' kernels): the same train step compiled by an uninterrupted
run, a killed one and its resumption is built once. A cached executable is
the one XLA built for the same program, so results do not depend on it. The
benchmark's compilation counts turn the cache off while they count
(``experiments.bench.harness.counting_compiles``).
"""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# submitit configures logging when imported (logging.config.dictConfig), which closes every handler
# already installed, pytest's capture among them: the executor tests ask it not to.
os.environ.setdefault("SUBMITIT_LOG_LEVEL", "NOCONFIG")
_CACHE = tempfile.mkdtemp(prefix="adpsgd-tests-xla-cache-")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.1"  # programs that take longer than this to build

import jax  # noqa: E402
import pytest  # noqa: E402

from adpsgd_jax import distributed  # noqa: E402

distributed.set_cpu_devices(8)
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session")
def mesh():
    """The 1-D mesh ("batch",) of the 8 devices, one worker each (tests/helpers.py)."""
    assert jax.device_count() == 8
    return distributed.workers().mesh


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE, ignore_errors=True)
