"""sparserl: statically sparse deep RL in JAX.

Importing the package turns on one XLA:CPU backend option before JAX creates its CPU client:
``xla_cpu_use_multi_output_fusion``. Without it XLA:CPU never fuses sibling elementwise loops,
so AdamW reads each gradient, moment and parameter several times (one loop per output); with it the
moment and parameter updates share loops, which cuts the update's memory traffic and lifts the
default SAC update by ~4% on the 2-core benchmark machine (``make bench``). GPU backends ignore the
option. It only takes effect if sparserl is imported before the first JAX computation; set
``SPARSERL_XLA_TUNING=0`` to leave ``XLA_FLAGS`` alone.
"""

import os as _os

_MULTI_OUTPUT_FUSION = "--xla_backend_extra_options=xla_cpu_use_multi_output_fusion"

if _os.environ.get("SPARSERL_XLA_TUNING", "1") != "0":
    _flags = _os.environ.get("XLA_FLAGS", "")
    if "xla_backend_extra_options" not in _flags:  # a user's own extra options win
        _os.environ["XLA_FLAGS"] = f"{_flags} {_MULTI_OUTPUT_FUSION}".strip()
