"""Repository-wide pytest setup (applies to tests/ and to samtx doctests).

Eight virtual CPU devices must be requested before JAX initialises its
backend, so multi-device tests (pmap, shard_map, sharded jit) run on a
single-CPU machine.
"""

import jax

jax.config.update("jax_num_cpu_devices", 8)
