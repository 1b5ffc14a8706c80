"""GPU and model catalog, and roofline step-time coefficients derived from it.

`gpu(name)` and `model(name_or_config_json)` look entries up (data: gpus.yaml and
models.yaml, every number with its source); `derive(...)` turns a GPU, a model and
a tensor-parallel degree into the engine's step-time coefficients and KV capacity,
and `Roofline.explain()` shows the arithmetic. Imports nothing else of `sim`.
"""
from .catalog import DTYPE_BYTES, CatalogError, Gpu, ModelShape, gpu, gpus, looks_like_path, model, models
from .roofline import DEFAULT_EFFICIENCY, EFFICIENCY_FIELDS, Efficiency, Roofline, derive

__all__ = [
    "CatalogError", "DEFAULT_EFFICIENCY", "DTYPE_BYTES", "EFFICIENCY_FIELDS", "Efficiency", "Gpu", "ModelShape",
    "Roofline", "derive", "gpu", "gpus", "looks_like_path", "model", "models",
]
