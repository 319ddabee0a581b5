"""Limits of the library that callers validate against. Imports nothing, so a
command line can check its flags before jax starts."""

MAX_QSGD_LEVELS = 32767  # QSGD's signed levels travel as int16 (int8 when s <= 127).
