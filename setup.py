"""Only the compiled parts: everything else about the package is in pyproject.toml.

The fast path's kernels (sim/_kernels.c), the event core (sim/_events.c), the event path's engine replica
(sim/_engine.c), the recorder's flat logs (sim/_records.c), the retrieval's backends and stages
(sim/_retrieval.c), the caches' operations (sim/_caches.c) and the request lifecycle (sim/_lifecycle.c) are
optional: where they cannot be built (no C compiler), the package installs without them and their pure-Python
twins run instead (same results, slower), with a warning.
"""
from setuptools import Extension, setup

# Python's own arithmetic, operation for operation: no fused multiply-add.
FLAGS = ["-O2", "-ffp-contract=off"]

# The fast path's kernel and the event path's replica share the engine's core (a header both include); the
# lifecycle, the retrieval and the caches share their calls into Python.
CORE = ["sim/_engine_core.h"]
CALLS = ["sim/_calls.h"]

setup(ext_modules=[Extension(f"sim.{name}", [f"sim/{name}.c"], depends=depends, optional=True,
                             extra_compile_args=FLAGS)
                   for name, depends in (("_kernels", CORE), ("_events", []), ("_engine", CORE), ("_records", []),
                                         ("_retrieval", CALLS), ("_caches", CALLS), ("_lifecycle", CALLS))])
