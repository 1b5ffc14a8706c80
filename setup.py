"""Only the compiled kernels: everything else about the package is in pyproject.toml.

The extension is optional: where it cannot be built (no C compiler), the package installs without it
and the kernels' pure-Python twins run instead (same results, slower), with a warning.
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension("sim._kernels", ["sim/_kernels.c"], optional=True,
                             # Python's own arithmetic, operation for operation: no fused multiply-add.
                             extra_compile_args=["-O2", "-ffp-contract=off"])])
