"""Engine coefficients from the GPU and model catalog: `engine: {gpu: h100-sxm, model: llama-3.1-8b}`.

`SelfHosted` calls `with_roofline` on its raw data before validating it: when the engine
names a catalog GPU and model (or a Hugging Face config.json), the roofline
(sim/catalog/roofline.py) derives the step-time coefficients, the KV capacity and a
default GPU price, and fills in what the user left out. Whatever the user gave wins,
field by field: a `step_time` with only `noise_cv` keeps the derived coefficients.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import ConfigDict, Field, ValidationError

from sim.catalog import DEFAULT_EFFICIENCY, CatalogError, Efficiency, Roofline, derive, gpu, model

from .base import Block

Dtype = Literal["bf16", "fp16", "fp8"]
KvDtype = Literal["auto", "bf16", "fp16", "fp8"]
_DEFAULT = DEFAULT_EFFICIENCY


def _factor(default: float, text: str, share: bool = True) -> Any:
    bounds = {"gt": 0, "le": 1} if share else {"ge": 0}
    return Field(None, **bounds, description=f"{text} (default {default:g}).")


class RooflineEfficiency(Block):
    """What share of the datasheet's peaks the engine reaches; each factor left out takes its default.

    The defaults are documented in sim/catalog/roofline.py and checked against published vLLM
    throughputs; `llmsim catalog --explain GPU MODEL` shows how each one enters the coefficients.
    """

    memory_bandwidth: Optional[float] = _factor(
        _DEFAULT.memory_bandwidth, "Share of peak memory bandwidth that decode's weight and KV reads reach")
    prefill_compute: Optional[float] = _factor(_DEFAULT.prefill_compute, "MFU of prefill (share of dense peak FLOP/s)")
    decode_compute: Optional[float] = _factor(
        _DEFAULT.decode_compute, "Share of dense peak FLOP/s reached by a full-batch decode step")
    attention_compute: Optional[float] = _factor(
        _DEFAULT.attention_compute, "Share of dense BF16 peak reached by prefill attention")
    interconnect: Optional[float] = _factor(
        _DEFAULT.interconnect, "Share of one direction of the GPU interconnect an all-reduce reaches")
    allreduce_latency_s: Optional[float] = _factor(
        _DEFAULT.allreduce_latency_s, "Latency of one all-reduce (2 per layer per step with TP > 1), seconds", False)
    step_overhead_s: Optional[float] = _factor(
        _DEFAULT.step_overhead_s, "Fixed time per step: scheduling, kernel launches, sampling, seconds", False)
    per_sequence_overhead_s: Optional[float] = _factor(
        _DEFAULT.per_sequence_overhead_s, "CPU time per running sequence per step, seconds", False)
    memory_utilisation: Optional[float] = _factor(
        _DEFAULT.memory_utilisation, "Share of GPU memory the engine may use (vLLM gpu_memory_utilization)")
    activation_reserve_gb: Optional[float] = _factor(
        _DEFAULT.activation_reserve_gb, "GiB per GPU kept for activations, CUDA graphs, buffers", False)

    def resolved(self) -> Efficiency:
        """The catalog's defaults with the factors given here."""
        return DEFAULT_EFFICIENCY.replace(**{k: v for k, v in self.model_dump().items() if v is not None})


class _CatalogChoice(Block):
    """The catalog keys of a raw engine mapping, checked before deriving (Engine re-checks and reports them).

    A Block, so `tensor_parallel: true` fails here too instead of deriving for 1 GPU.
    """

    model_config = ConfigDict(extra="ignore")
    gpu: str
    model: str
    tensor_parallel: int = Field(1, ge=1)
    dtype: Optional[Dtype] = None
    kv_dtype: KvDtype = "auto"
    efficiency: Optional[RooflineEfficiency] = None


@dataclass(frozen=True)
class Derived:
    """A self_hosted mapping with the roofline's values filled in, and the roofline (None: nothing derived)."""

    data: Any
    roofline: Optional[Roofline] = None
    typed: tuple[str, ...] = ()  # step_time coefficients the user gave, which override the derived ones


def with_roofline(data: Any, max_batch_default: int, context: Optional[dict]) -> Derived:
    """Fill a raw self_hosted mapping's engine from the catalog; unchanged when its engine names no GPU and model.

    Raises ValueError ('engine.gpu: unknown GPU ...') for names the catalog does not know and
    for a model that does not fit; leaves malformed values to the schema's own messages.
    """
    engine = data.get("engine") if isinstance(data, dict) else None
    if not isinstance(engine, dict) or engine.get("gpu") is None or engine.get("model") is None:
        return Derived(data)
    try:
        choice = _CatalogChoice.model_validate(engine)
    except ValidationError:
        return Derived(data)
    max_batch = data.get("max_batch", max_batch_default)
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        return Derived(data)
    roofline = _derive(choice, max_batch, (context or {}).get("base_dir"), "tensor_parallel" in engine)
    given = engine.get("step_time")
    typed = tuple(k for k in roofline.coefficients() if isinstance(given, dict) and k in given)
    return Derived(_filled(data, engine, roofline), roofline, typed)


def _derive(choice: _CatalogChoice, max_batch: int, base_dir: Optional[str], tp_given: bool) -> Roofline:
    try:
        the_gpu = gpu(choice.gpu)
    except CatalogError as err:
        raise ValueError(f"engine.gpu: {err}") from None
    try:
        the_model = model(choice.model, Path(base_dir) if base_dir else None)
    except CatalogError as err:
        raise ValueError(f"engine.model: {err}") from None
    efficiency = choice.efficiency.resolved() if choice.efficiency is not None else DEFAULT_EFFICIENCY
    try:
        return derive(the_gpu, the_model, choice.tensor_parallel, choice.dtype, choice.kv_dtype, efficiency, max_batch)
    except ValueError as err:
        raise ValueError(f"engine.{'tensor_parallel' if tp_given else 'model'}: {err}") from None


def _filled(data: dict, engine: dict, roofline: Roofline) -> dict:
    """Copies of the mappings with the derived values where the user gave none."""
    given = engine.get("step_time")
    if given is None:
        step_time = roofline.coefficients()
    else:  # a malformed step_time is left for the schema to report
        step_time = {**roofline.coefficients(), **given} if isinstance(given, dict) else given
    engine = {**engine, "step_time": step_time}
    engine.setdefault("kv_cache_tokens", roofline.kv_cache_tokens)
    filled = {**data, "engine": engine}
    filled.setdefault("gpu_hourly_usd", roofline.gpu.price_usd_per_hour)
    return filled
