"""What `llmsim catalog` prints: the catalog as tables or JSON, and a roofline as JSON."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

from .catalog import Gpu, ModelShape, gpus, models
from .roofline import Roofline


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell: numbers right-aligned, the first and last (names) left-aligned."""
    widths = [max(len(row[k]) for row in [header, *rows]) for k in range(len(header))]

    def line(row: list[str]) -> str:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:-1], widths[1:-1])] + [row[-1]]
        return "  ".join(cells).rstrip()

    return [line(header), *map(line, rows)]


def _gpu_row(g: Gpu) -> list[str]:
    fp8 = f"{g.fp8_tflops:g}" if g.fp8_tflops else "-"
    return [g.key, f"{g.memory_gb:g}", f"{g.memory_bandwidth_tb_s:g}", f"{g.bf16_tflops:g}", fp8,
            f"{g.interconnect_gb_s:g}", f"{g.price_usd_per_hour:.2f}", g.name]


def _model_row(m: ModelShape) -> list[str]:
    active = f"{m.active_params / 1e9:.1f}" if m.is_moe else "-"
    kv_kib = m.kv_bytes_per_token(2, 1) / 1024
    return [m.key, f"{m.total_params / 1e9:.1f}", active, str(m.layers), str(m.hidden), f"{m.heads}/{m.kv_heads}",
            f"{kv_kib:.4g}", f"{m.max_context:,}", m.dtype]


def catalog_text() -> str:
    """Both catalogs as aligned tables, with units in the headers."""
    gpu_rows = [_gpu_row(g) for g in gpus().values()]
    model_rows = [_model_row(m) for m in models().values()]
    lines = ["GPUs (dense tensor TFLOP/s; interconnect: NVLink / Infinity Fabric / PCIe per GPU, both directions)"]
    lines += _table(["gpu", "GiB", "TB/s", "BF16", "FP8", "link GB/s", "$/GPU-h", "name"], gpu_rows)
    lines += ["", "Models (params in billions; KV per token at BF16 on one GPU)"]
    lines += _table(["model", "params", "active", "layers", "hidden", "heads/kv", "KV KiB", "context", "dtype"],
                    model_rows)
    lines += ["", "Sources: sim/catalog/gpus.yaml and models.yaml. "
              "Derive step times: llmsim catalog --explain GPU MODEL [TP]"]
    return "\n".join(lines)


def catalog_json() -> dict[str, Any]:
    """Every entry with every field (sources and prices included), for scripts."""
    return {"gpus": {k: asdict(g) for k, g in gpus().items()},
            "models": {k: {**asdict(m), "total_params": m.total_params, "active_params": m.active_params}
                       for k, m in models().items()}}


def roofline_json(r: Roofline, context_tokens: int) -> dict[str, Any]:
    """A derivation as one JSON object: inputs, coefficients, capacity, predictions and the explanation."""
    return {
        "gpu": r.gpu.key, "model": r.model.key, "tensor_parallel": r.tensor_parallel, "dtype": r.dtype,
        "kv_dtype": r.kv_dtype, "max_batch": r.max_batch, "gpus_per_replica": r.gpus_per_replica,
        "gpu_hourly_usd": r.gpu.price_usd_per_hour, "efficiency": asdict(r.efficiency),
        "step_time": r.coefficients(), "kv_cache_tokens": r.kv_cache_tokens,
        "predictions": r.predictions(context_tokens), "explanation": r.explain(context_tokens),
    }
