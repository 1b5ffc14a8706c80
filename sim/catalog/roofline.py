"""Step-time coefficients of an iteration-level engine from a GPU's datasheet and a model's shape.

The engine's step time is linear (see `StepTime` in sim/config/serving.py):

    step = base + per_decode_seq x decoding seqs + per_kv_token x their context tokens
         + per_prefill_token x prompt tokens + per_prefill_attention x prefill attention pairs

A replica is `t` GPUs running the model with tensor parallelism (each holds 1/t of
the weights and of the attention heads, and two all-reduces per layer join their
partial results). The physics behind each coefficient:

- Decode is bandwidth-bound. A step reads every weight once, whatever the batch:
  weight bytes / (t x bandwidth x memory_bandwidth efficiency). Each decoding
  sequence reads its whole KV cache: per_kv_token = KV bytes per token on a GPU /
  (bandwidth x efficiency), the KV heads being split across the t GPUs (replicated
  when there are fewer KV heads than GPUs; MLA's compressed latent is held whole
  by every GPU).
- The per-sequence compute (2 x active parameters FLOPs per token, at the
  decode_compute efficiency) hides behind the weight read until the batch is large:
  the roofline step of n sequences is max(weight read, n x compute per token). A
  linear model cannot express the max, so the coefficients are its chord: the
  linear step equals the roofline step exactly at one sequence and at the full
  batch `max_batch` (both with no context), and lies between (above the roofline in
  between: conservative) and beyond (a batch cannot exceed max_batch).
- Mixture of experts: a step reads the shared weights and only the experts its
  tokens are routed to; with uniform, independent routing a batch of n tokens
  touches E (1 - (1 - k/E)^n) of the E experts of a layer (k per token). That read
  is in the roofline at 1 and at max_batch, so the chord carries it too (a dozen
  sequences already touch most of Mixtral's 8 experts; the chord is below the
  curve for small batches).
- Prefill is compute-bound: 2 x active parameters FLOPs per prompt token at the
  prefill_compute efficiency (MFU), and 4 x layers x heads x head_dim FLOPs per
  (prompt token, context token) pair of attention at the attention_compute
  efficiency (FlashAttention's share of peak), both spread over the t GPUs.
- Tensor parallelism adds two all-reduces per layer per step: a latency
  (allreduce_latency_s each) in base, and per token processed (decoding or
  prefilled) the bytes a ring all-reduce sends, 2 (t-1)/t x hidden x 2 bytes per
  all-reduce, at one direction of the GPU's interconnect x the interconnect
  efficiency.
- A fixed per-step overhead (scheduler, kernel launches, sampling: step_overhead_s)
  goes into base, and a per-sequence one (CPU work per running sequence per step:
  input preparation, sampling, detokenising, stop checks: per_sequence_overhead_s)
  into per_decode_seq.

KV capacity (tokens) = (memory_utilisation x GPU memory - weights / t - activation
reserve) / KV bytes per token per GPU, with vLLM's default gpu_memory_utilization
of 0.9. A model whose weights leave no room for KV at that tensor parallelism is
a ValueError.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

from .catalog import DTYPE_BYTES, GIB, Gpu, ModelShape

ACTIVATION_BYTES = 2
"""Activations travel between GPUs in BF16."""


@dataclass(frozen=True)
class Efficiency:
    """Named efficiency factors: what share of the datasheet's peaks a real engine (vLLM) reaches.

    The defaults come from what the kernels reach on their own, checked once against
    published vLLM figures (tests/data/vllm_published.yaml), not tuned per figure:
    memory_bandwidth and step_overhead_s meet single-stream decode (75 tokens/s for
    Llama 3.1 8B on an A100 40GB, 154 on an H100); decode_compute and
    per_sequence_overhead_s sit between full-batch figures that disagree with the
    roofline in opposite directions by up to 20% (ShareGPT's short requests faster than
    published, long decode-heavy ones slower). Override them with your own measurements.
    """

    memory_bandwidth: float = 0.80
    """Share of peak memory bandwidth reached by decode's weight and KV reads. Streaming
    kernels reach ~90% of HBM peak; a decode step's many small GEMVs and attention
    kernels ~75-85% (vLLM's single-stream decode of Llama 3.1 8B runs at ~77% of the A100's
    bandwidth roofline: https://johnmusgrave.com/p/vllm-throughput-latency-sweep-on)."""

    prefill_compute: float = 0.55
    """MFU of prefill: large GEMMs reach 60-75% of dense peak; norms, RoPE, activations
    and the LM head of the chunk pull a forward pass down to ~50-60%."""

    decode_compute: float = 0.30
    """Share of dense peak reached by a full-batch decode step's compute: its GEMMs are
    only max_batch rows tall (256), which keeps tensor cores near half their large-GEMM
    efficiency, and the step's other kernels (paged attention, norms, activations,
    sampling over the vocabulary) add time in proportion to the batch."""

    attention_compute: float = 0.40
    """Share of dense BF16 peak reached by prefill attention (FlashAttention-2 forward
    reaches 50-70% on A100, FlashAttention-3 ~75% on H100, less with the short,
    ragged chunks of chunked prefill)."""

    interconnect: float = 0.70
    """Share of one direction of NVLink/PCIe bandwidth an all-reduce of one step's
    activations reaches (NCCL's bus bandwidth for messages of a few MB)."""

    allreduce_latency_s: float = 10e-6
    """Latency of one all-reduce between the GPUs of a replica (NCCL / vLLM's custom
    all-reduce on NVLink: 5-20 us for small messages)."""

    step_overhead_s: float = 1.0e-3
    """Fixed time of a step besides the roofline: scheduling, input preparation and
    the launch gaps of a few hundred kernels, sampling."""

    per_sequence_overhead_s: float = 10e-6
    """CPU time per running sequence per step that the GPU waits for: block tables,
    sampling, detokenising and stop checks (vLLM's Python scheduler and output path,
    overlapped in part with the GPU since v0.6)."""

    memory_utilisation: float = 0.90
    """Share of GPU memory the engine may use (vLLM's gpu_memory_utilization default)."""

    activation_reserve_gb: float = 2.0
    """GiB per GPU kept for activations, CUDA graphs and communication buffers (vLLM
    profiles ~1-3 GiB of these for a 8192-token step)."""

    def replace(self, **changes: float) -> "Efficiency":
        """A copy with some factors changed."""
        return Efficiency(**{**asdict(self), **changes})


EFFICIENCY_FIELDS = tuple(f.name for f in fields(Efficiency))
DEFAULT_EFFICIENCY = Efficiency()


@dataclass(frozen=True)
class Roofline:
    """The derived coefficients and the quantities they came from (see `explain`)."""

    gpu: Gpu
    model: ModelShape
    tensor_parallel: int
    dtype: str
    kv_dtype: str
    efficiency: Efficiency
    max_batch: int
    base_s: float
    per_decode_seq_s: float
    per_kv_token_s: float
    per_prefill_token_s: float
    per_prefill_attention_s: float
    kv_cache_tokens: int
    weights_bytes_per_gpu: float
    kv_bytes_per_token_per_gpu: float
    kv_budget_bytes_per_gpu: float
    flops_per_token: float
    comm_s_per_token: float
    roofline_one_s: float
    roofline_full_s: float

    @property
    def gpus_per_replica(self) -> int:
        return self.tensor_parallel

    def coefficients(self) -> dict[str, float]:
        """The StepTime fields this roofline derives."""
        return {name: getattr(self, name) for name in
                ("base_s", "per_decode_seq_s", "per_kv_token_s", "per_prefill_token_s", "per_prefill_attention_s")}

    def describe(self) -> str:
        """One line for reports: where the coefficients came from (they belong to this host and setup)."""
        return (f"roofline of {self.gpu.key} x {self.model.key}, TP {self.tensor_parallel}, "
                f"{self.dtype} weights, {self.kv_dtype} KV")

    def decode_step_s(self, decoding: int, context_tokens: float) -> float:
        """Linear step time of `decoding` sequences with `context_tokens` of context each."""
        return self.base_s + decoding * (self.per_decode_seq_s + self.per_kv_token_s * context_tokens)

    def predictions(self, context_tokens: int = 1024) -> dict[str, float]:
        """Single-stream decode speed and the full-batch step at `context_tokens` of context per sequence.

        The full batch is max_batch, or what the KV cache holds at that context.
        """
        single = self.decode_step_s(1, context_tokens)
        batch = min(self.max_batch, max(1, self.kv_cache_tokens // max(context_tokens, 1)))
        full = self.decode_step_s(batch, context_tokens)
        return {"context_tokens": context_tokens, "single_stream_step_s": single,
                "single_stream_tokens_per_s": 1.0 / single, "full_batch": batch, "full_batch_step_s": full,
                "full_batch_tokens_per_s": batch / full}

    def explain(self, context_tokens: int = 1024) -> list[str]:
        """The derivation as readable lines, with the arithmetic."""
        from .explain import explain_lines

        return explain_lines(self, context_tokens)


def kv_dtype_bytes(kv_dtype: str, dtype: str) -> int:
    """KV entry size: 'auto' stores KV in the activations' format, BF16 (also for FP8 weights, as vLLM does)."""
    return DTYPE_BYTES["bf16" if kv_dtype == "auto" else kv_dtype]


def derive(gpu: Gpu, model: ModelShape, tensor_parallel: int = 1, dtype: Optional[str] = None,
           kv_dtype: str = "auto", efficiency: Efficiency = DEFAULT_EFFICIENCY, max_batch: int = 256) -> Roofline:
    """Derive the step-time coefficients and KV capacity of one replica (see the module docstring)."""
    dtype = dtype or model.dtype
    _check_inputs(tensor_parallel, dtype, kv_dtype, max_batch)
    _check_split(model, tensor_parallel)
    t, eff = tensor_parallel, efficiency
    bandwidth = gpu.bandwidth_bytes_s * eff.memory_bandwidth
    weights_per_gpu = model.total_params * DTYPE_BYTES[dtype] / t
    kv_per_token = model.kv_bytes_per_token(kv_dtype_bytes(kv_dtype, dtype), t)
    kv_budget = _kv_budget(gpu, model, t, dtype, weights_per_gpu, eff)
    flops_per_token = 2 * model.active_params
    comm = _comm_per_token(gpu, model, t, eff)

    def roofline_step(n: int) -> float:
        read = model.params_read(n) * DTYPE_BYTES[dtype] / t / bandwidth
        compute = n * flops_per_token / (t * gpu.peak_flops(dtype) * eff.decode_compute)
        return _fixed_per_step(model, t, eff) + n * (eff.per_sequence_overhead_s + comm) + max(read, compute)

    one, full = roofline_step(1), roofline_step(max_batch)
    per_seq = (full - one) / (max_batch - 1) if max_batch > 1 else eff.per_sequence_overhead_s + comm
    prefill = flops_per_token / (t * gpu.peak_flops(dtype) * eff.prefill_compute) + comm
    attention = model.attention_flops_per_pair() / (t * gpu.peak_flops("bf16") * eff.attention_compute)
    return Roofline(
        gpu=gpu, model=model, tensor_parallel=t, dtype=dtype, kv_dtype=kv_dtype, efficiency=eff, max_batch=max_batch,
        base_s=one - per_seq, per_decode_seq_s=per_seq, per_kv_token_s=kv_per_token / bandwidth,
        per_prefill_token_s=prefill, per_prefill_attention_s=attention,
        kv_cache_tokens=int(kv_budget // kv_per_token), weights_bytes_per_gpu=weights_per_gpu,
        kv_bytes_per_token_per_gpu=kv_per_token, kv_budget_bytes_per_gpu=kv_budget,
        flops_per_token=flops_per_token, comm_s_per_token=comm, roofline_one_s=one, roofline_full_s=full,
    )


def _check_inputs(tensor_parallel: int, dtype: str, kv_dtype: str, max_batch: int) -> None:
    if tensor_parallel < 1:
        raise ValueError(f"tensor_parallel must be at least 1, got {tensor_parallel}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    if kv_dtype != "auto" and kv_dtype not in DTYPE_BYTES:
        raise ValueError(f"kv_dtype must be auto or one of {', '.join(DTYPE_BYTES)}, got {kv_dtype!r}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")


def _check_split(model: ModelShape, tensor_parallel: int) -> None:
    """Tensor parallelism splits the attention heads evenly (vLLM refuses a degree that does not divide them)."""
    if model.heads % tensor_parallel:
        raise ValueError(f"tensor_parallel {tensor_parallel} does not divide {model.key}'s {model.heads} attention heads")


def _kv_budget(gpu: Gpu, model: ModelShape, t: int, dtype: str, weights_per_gpu: float, eff: Efficiency) -> float:
    """Bytes per GPU left for the KV cache; ValueError when the weights leave none."""
    usable = eff.memory_utilisation * gpu.memory_bytes - eff.activation_reserve_gb * GIB
    budget = usable - weights_per_gpu
    if budget <= 0:
        needed = math.ceil(weights_per_gpu * t / usable) if usable > 0 else None
        hint = f"; the weights alone need {needed} such GPUs" if needed else ""
        raise ValueError(
            f"{model.key} ({dtype}) does not fit on {t} x {gpu.key}: {weights_per_gpu / GIB:.1f} GiB of weights per GPU "
            f"against {usable / GIB:.1f} GiB usable ({eff.memory_utilisation:g} x {gpu.memory_gb:g} GiB "
            f"- {eff.activation_reserve_gb:g} GiB reserve), no room for a KV cache{hint}")
    return budget


def _fixed_per_step(model: ModelShape, t: int, eff: Efficiency) -> float:
    """Per-step time besides reads and compute: the overhead and, with TP, 2 all-reduce latencies a layer."""
    allreduce = 2 * model.layers * eff.allreduce_latency_s if t > 1 else 0.0
    return eff.step_overhead_s + allreduce


def _comm_per_token(gpu: Gpu, model: ModelShape, t: int, eff: Efficiency) -> float:
    """Seconds of all-reduce traffic per token processed: 2 per layer, ring volume 2 (t-1)/t x hidden x 2 bytes."""
    if t == 1:
        return 0.0
    bytes_per_token = 2 * model.layers * 2 * (t - 1) / t * model.hidden * ACTIVATION_BYTES
    return bytes_per_token / (gpu.link_one_way_bytes_s * eff.interconnect)
