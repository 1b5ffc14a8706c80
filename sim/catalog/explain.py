"""`Roofline.explain`: the derivation of each coefficient as lines a person can check by hand."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .catalog import DTYPE_BYTES, GIB
from .roofline import EFFICIENCY_FIELDS, kv_dtype_bytes

if TYPE_CHECKING:
    from .roofline import Roofline


def seconds(value: float) -> str:
    """A duration with a unit that keeps 3-4 significant digits."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9)):
        if abs(value) >= scale or unit == "ns":
            return f"{value / scale:.4g} {unit}"
    return f"{value:g} s"


def explain_lines(r: "Roofline", context_tokens: int) -> list[str]:
    """Every step of `derive`, with numbers (see roofline.py for the physics)."""
    return [*_setup(r), *_decode(r), *_prefill(r), *_capacity(r), *_predictions(r, context_tokens)]


def _setup(r: "Roofline") -> list[str]:
    g, m, eff = r.gpu, r.model, r.efficiency
    factors = ", ".join(f"{name} {getattr(eff, name):g}" for name in EFFICIENCY_FIELDS)
    moe = (f", MoE {m.experts} experts ({m.experts_per_token} per token)" if m.is_moe else "")
    return [
        f"{r.describe()}, max_batch {r.max_batch}",
        f"GPU {g.key}: {g.name}, {g.memory_gb:g} GiB, {g.memory_bandwidth_tb_s:g} TB/s, dense {g.bf16_tflops:g} BF16"
        + (f" / {g.fp8_tflops:g} FP8" if g.fp8_tflops else "") + f" TFLOP/s, {g.interconnect} {g.interconnect_gb_s:g} GB/s",
        f"model {m.key}: {m.name}, {m.total_params / 1e9:.3g}B params{moe}, {m.layers} layers, hidden {m.hidden}, "
        f"{m.heads} heads, {m.kv_heads} KV heads x {m.head_dim}" + (", MLA" if m.uses_mla else ""),
        f"efficiency: {factors}",
    ]


def _decode(r: "Roofline") -> list[str]:
    g, m, eff, t = r.gpu, r.model, r.efficiency, r.tensor_parallel
    wbytes = DTYPE_BYTES[r.dtype]
    bandwidth = g.bandwidth_bytes_s * eff.memory_bandwidth
    read_one = m.params_read(1) * wbytes / t
    compute_peak = g.peak_flops(r.dtype) * eff.decode_compute
    lines = [
        f"weights: {m.total_params / 1e9:.4g}e9 params x {wbytes} B / {t} GPU = {r.weights_bytes_per_gpu / 1e9:.4g} GB per GPU",
        f"decode weight read, 1 sequence: {m.params_read(1) / 1e9:.4g}e9 params read (input embedding is a lookup"
        + (f"; {m.experts_touched(1):.3g} of {m.experts} experts" if m.is_moe else "")
        + f") x {wbytes} B / {t} = {read_one / 1e9:.4g} GB / ({g.memory_bandwidth_tb_s:g} TB/s x {eff.memory_bandwidth:g})"
        f" = {seconds(read_one / bandwidth)}",
    ]
    if m.is_moe:
        touched = m.experts_touched(r.max_batch)
        lines.append(f"  at {r.max_batch} sequences the batch touches {touched:.3g} of {m.experts} experts per layer: "
                     f"{m.params_read(r.max_batch) * wbytes / t / 1e9:.4g} GB per GPU")
    lines += [
        f"decode compute: 2 x {m.active_params / 1e9:.4g}e9 active params = {r.flops_per_token / 1e9:.4g} GFLOP per token "
        f"/ ({t} x {g.peak_flops(r.dtype) / 1e12:g} TFLOP/s x {eff.decode_compute:g}) = "
        f"{seconds(r.flops_per_token / (t * compute_peak))} per sequence",
        *_tensor_parallel(r),
        f"roofline step, 1 sequence: {seconds(r.roofline_one_s)}; {r.max_batch} sequences: {seconds(r.roofline_full_s)} "
        f"(overhead {seconds(eff.step_overhead_s)} + {seconds(eff.per_sequence_overhead_s)} per sequence "
        "+ max(weight read, compute), no context)",
        f"per_decode_seq_s = ({seconds(r.roofline_full_s)} - {seconds(r.roofline_one_s)}) / ({r.max_batch} - 1) = "
        f"{seconds(r.per_decode_seq_s)} (the chord through both)",
        f"base_s = {seconds(r.roofline_one_s)} - {seconds(r.per_decode_seq_s)} = {seconds(r.base_s)}",
        f"KV per token per GPU: {_kv_formula(r)} = {r.kv_bytes_per_token_per_gpu:,.0f} B",
        f"per_kv_token_s = {r.kv_bytes_per_token_per_gpu:,.0f} B / {bandwidth / 1e12:.4g} TB/s = {seconds(r.per_kv_token_s)}",
    ]
    return lines


def _kv_formula(r: "Roofline") -> str:
    m, kvb = r.model, kv_dtype_bytes(r.kv_dtype, r.dtype)
    if m.uses_mla:
        return (f"{m.layers} layers x ({m.kv_lora_rank} latent + {m.qk_rope_head_dim} RoPE) x {kvb} B "
                "(MLA, whole on every GPU)")
    per_gpu = -(-m.kv_heads // r.tensor_parallel)
    split = f"{m.kv_heads} KV heads / TP {r.tensor_parallel} -> {per_gpu}" if r.tensor_parallel > 1 else f"{m.kv_heads} KV heads"
    return f"2 (K, V) x {m.layers} layers x {split} x {m.head_dim} dims x {kvb} B"


def _tensor_parallel(r: "Roofline") -> list[str]:
    if r.tensor_parallel == 1:
        return ["tensor parallelism: none (TP 1), no all-reduces"]
    m, eff, t = r.model, r.efficiency, r.tensor_parallel
    return [
        f"all-reduce latency: 2 x {m.layers} layers x {seconds(eff.allreduce_latency_s)} = "
        f"{seconds(2 * m.layers * eff.allreduce_latency_s)} per step (in base_s)",
        f"all-reduce traffic: 2 x {m.layers} x 2 ({t}-1)/{t} x {m.hidden} x 2 B per token / "
        f"({r.gpu.link_one_way_bytes_s / 1e9:g} GB/s one way x {eff.interconnect:g}) = {seconds(r.comm_s_per_token)} "
        "per token (in per_decode_seq_s and per_prefill_token_s)",
    ]


def _prefill(r: "Roofline") -> list[str]:
    g, m, eff, t = r.gpu, r.model, r.efficiency, r.tensor_parallel
    comm = f" + {seconds(r.comm_s_per_token)} all-reduce" if t > 1 else ""
    return [
        f"per_prefill_token_s = {r.flops_per_token / 1e9:.4g} GFLOP / ({t} x {g.peak_flops(r.dtype) / 1e12:g} TFLOP/s x "
        f"{eff.prefill_compute:g}){comm} = {seconds(r.per_prefill_token_s)}",
        f"per_prefill_attention_s = {m.attention_flops_per_pair():,.0f} FLOP per pair / ({t} x {g.bf16_tflops:g} TFLOP/s x "
        f"{eff.attention_compute:g}) = {seconds(r.per_prefill_attention_s)}",
    ]


def _capacity(r: "Roofline") -> list[str]:
    g, eff = r.gpu, r.efficiency
    return [
        f"KV cache: {eff.memory_utilisation:g} x {g.memory_gb:g} GiB - {eff.activation_reserve_gb:g} GiB reserve - "
        f"{r.weights_bytes_per_gpu / GIB:.4g} GiB weights = {r.kv_budget_bytes_per_gpu / GIB:.4g} GiB per GPU / "
        f"{r.kv_bytes_per_token_per_gpu:,.0f} B = kv_cache_tokens {r.kv_cache_tokens:,}",
    ]


def _predictions(r: "Roofline", context: int) -> list[str]:
    p = r.predictions(context)
    batch = p["full_batch"]
    limited = "" if batch == r.max_batch else f" (the KV cache holds only {batch} such sequences)"
    return [
        f"predicted single-stream decode at {context:,} tokens of context: {seconds(p['single_stream_step_s'])} per "
        f"token = {p['single_stream_tokens_per_s']:,.1f} tokens/s",
        f"predicted full-batch decode step, {batch} sequences at {context:,} tokens{limited}: "
        f"{seconds(p['full_batch_step_s'])} = {p['full_batch_tokens_per_s']:,.0f} output tokens/s",
        f"gpus_per_replica = {r.gpus_per_replica}",
    ]
