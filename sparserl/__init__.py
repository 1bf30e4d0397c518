"""sparserl: statically sparse deep RL in JAX.

Importing the package turns on one XLA:CPU backend option before JAX creates its CPU client:
``xla_cpu_use_multi_output_fusion``. Without it XLA:CPU never fuses sibling elementwise loops,
so AdamW reads each gradient, moment and parameter several times (one loop per output); with it the
moment and parameter updates share loops, which cuts the update's memory traffic and lifts the
default SAC update by ~4% on the 2-core benchmark machine (``make bench``). GPU backends ignore the
option. It only takes effect if sparserl is imported before the first JAX computation; set
``SPARSERL_XLA_TUNING=0`` (or ``SPARSERL_BACKEND=plain``) to leave ``XLA_FLAGS`` alone. The flag, like
every backend-dependent choice, is defined in :mod:`sparserl.backend`; this import stays free of JAX
so that it runs before JAX starts.
"""

from sparserl import backend as _backend

_backend.apply_xla_flags()
