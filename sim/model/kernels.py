"""The compiled parts (sim/_kernels.c, _events.c, _engine.c, _records.c, _retrieval.c, _caches.c, _lifecycle.c),
or None for each one not built.

Each has a pure-Python twin that gives the same bits, slower: it runs where the package was
installed without a C compiler, and wherever `LLMSIM_PURE_PYTHON=1` is set (to profile the
Python, or to check that both give the same results).
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Optional

PURE_PYTHON = os.environ.get("LLMSIM_PURE_PYTHON", "") not in ("", "0")


def compiled(name: str) -> Optional[ModuleType]:
    """The compiled module `sim.<name>`, or None (not built, or LLMSIM_PURE_PYTHON set)."""
    if PURE_PYTHON:
        return None
    try:
        return importlib.import_module(f"sim.{name}")
    except ImportError:
        return None


def not_built(parts: list[str]) -> str:
    """The warning for compiled parts a run needed that are not built (their Python twins ran instead)."""
    return (f"not built: the compiled {', '.join(parts)}: the same results, slower (Python ran instead); reinstall "
            "where a C compiler is available")
