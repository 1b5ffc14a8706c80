"""The GPU and model catalog: typed entries read from gpus.yaml and models.yaml.

Lookups are by name, case- and separator-insensitive (`H100 SXM`, `h100_sxm` and
`h100-sxm` are one GPU); an unknown name is a `CatalogError` whose one line lists
the known names and the closest one. A model may also be a path to a Hugging Face
`config.json` (see `hf_config.py`). This package imports nothing else of `sim`:
the config layer imports it.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Union

import yaml

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1}
"""Bytes per weight (or KV entry) of each supported number format."""

GIB = 2 ** 30


class CatalogError(ValueError):
    """A name the catalog does not know, or a model file it cannot read (one line, for the user)."""


@dataclass(frozen=True)
class Gpu:
    """One GPU model's datasheet figures (see gpus.yaml for what each means)."""

    key: str
    name: str
    memory_gb: float
    memory_bandwidth_tb_s: float
    bf16_tflops: float
    fp8_tflops: Optional[float]
    interconnect: str
    interconnect_gb_s: float
    price_usd_per_hour: float
    price_source: str
    source: tuple[str, ...]
    aliases: tuple[str, ...] = ()

    @property
    def memory_bytes(self) -> float:
        """GPU memory in bytes (vendors' GB of HBM/GDDR are GiB)."""
        return self.memory_gb * GIB

    @property
    def bandwidth_bytes_s(self) -> float:
        return self.memory_bandwidth_tb_s * 1e12

    def peak_flops(self, dtype: str) -> float:
        """Dense tensor FLOP/s for matrix products in `dtype` (FP8 falls back to BF16 math where there is none)."""
        if dtype == "fp8" and self.fp8_tflops:
            return self.fp8_tflops * 1e12
        return self.bf16_tflops * 1e12

    @property
    def link_one_way_bytes_s(self) -> float:
        """What one GPU can send to the others per second: half the vendor's two-way figure."""
        return self.interconnect_gb_s * 1e9 / 2


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer's shape, as its config.json gives it (see models.yaml)."""

    key: str
    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_context: int
    source: str
    tie_embeddings: bool = False
    dtype: str = "bf16"
    params_b: Optional[float] = None
    active_params_b: Optional[float] = None
    experts: int = 0
    experts_per_token: int = 0
    moe_intermediate: int = 0
    shared_expert_intermediate: int = 0
    dense_layers: int = 0
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    aliases: tuple[str, ...] = field(default=())

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    @property
    def uses_mla(self) -> bool:
        """Multi-head latent attention (DeepSeek): the KV cache holds a compressed latent per token."""
        return self.kv_lora_rank > 0

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers if self.is_moe else 0

    @property
    def expert_params(self) -> float:
        """Parameters of one routed expert summed over the MoE layers (gate, up and down projections)."""
        return self.moe_layers * 3 * self.hidden * self.moe_intermediate

    @property
    def routed_params(self) -> float:
        return self.experts * self.expert_params

    @property
    def embedding_params(self) -> float:
        return self.vocab * self.hidden

    def attention_params_per_layer(self) -> float:
        """Weights of one attention block (Q, K, V and output projections; MLA's low-rank ones)."""
        if self.uses_mla:
            qk_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
            q = (self.hidden * self.q_lora_rank + self.q_lora_rank * self.heads * qk_dim
                 if self.q_lora_rank else self.hidden * self.heads * qk_dim)
            kv = (self.hidden * (self.kv_lora_rank + self.qk_rope_head_dim)
                  + self.kv_lora_rank * self.heads * (self.qk_nope_head_dim + self.v_head_dim))
            return q + kv + self.heads * self.v_head_dim * self.hidden
        q_and_o = 2 * self.hidden * self.heads * self.head_dim
        return q_and_o + 2 * self.hidden * self.kv_heads * self.head_dim

    def computed_params(self) -> float:
        """Parameters counted from the shape (norms and biases, well under 0.1%, left out)."""
        dense_mlp = (self.layers - self.moe_layers) * 3 * self.hidden * self.intermediate
        shared = self.moe_layers * 3 * self.hidden * self.shared_expert_intermediate
        routers = self.moe_layers * self.experts * self.hidden
        embeddings = self.embedding_params * (1 if self.tie_embeddings else 2)
        return (self.layers * self.attention_params_per_layer() + dense_mlp + shared + routers
                + self.routed_params + embeddings)

    @property
    def total_params(self) -> float:
        """The model card's parameter count where the catalog has one, else the count from the shape."""
        return self.params_b * 1e9 if self.params_b else self.computed_params()

    @property
    def streamed_params(self) -> float:
        """Parameters a forward pass reads as matrices: all but an untied input embedding (a row lookup)."""
        return self.total_params - (0 if self.tie_embeddings else self.embedding_params)

    def experts_touched(self, tokens: float) -> float:
        """Expected routed experts per MoE layer that `tokens` tokens use, routing uniform and independent."""
        if not self.is_moe:
            return 0.0
        return self.experts * (1.0 - (1.0 - self.experts_per_token / self.experts) ** max(tokens, 0.0))

    def params_read(self, tokens: float) -> float:
        """Parameters one step reads for a batch of `tokens` tokens (MoE: only the experts they use)."""
        if not self.is_moe:
            return self.streamed_params
        unused = self.experts - self.experts_touched(tokens)
        return self.streamed_params - unused * self.expert_params

    @property
    def active_params(self) -> float:
        """Parameters one token multiplies with: all streamed ones, of the routed experts only its own."""
        if not self.is_moe:
            return self.streamed_params
        return self.streamed_params - (self.experts - self.experts_per_token) * self.expert_params

    def kv_bytes_per_token(self, kv_bytes: int, tensor_parallel: int) -> float:
        """KV cache bytes one token takes on each GPU of a replica.

        Standard attention: K and V of the KV heads, which tensor parallelism splits
        across the GPUs (a GPU holds at least one head: with fewer KV heads than GPUs
        they are replicated). MLA: the compressed latent and the RoPE key, which every
        GPU holds whole (as vLLM does).
        """
        if self.uses_mla:
            return self.layers * (self.kv_lora_rank + self.qk_rope_head_dim) * kv_bytes
        heads_per_gpu = math.ceil(self.kv_heads / tensor_parallel)
        return 2 * self.layers * heads_per_gpu * self.head_dim * kv_bytes

    def attention_flops_per_pair(self) -> float:
        """FLOPs of one (query token, key token) pair over all layers: Q.K and the weighted sum of V."""
        if self.uses_mla:
            return 2 * self.layers * self.heads * (self.qk_nope_head_dim + self.qk_rope_head_dim + self.v_head_dim)
        return 4 * self.layers * self.heads * self.head_dim


def normalise(name: str) -> str:
    """The catalog's spelling of a name: lower case, words joined by hyphens."""
    return "-".join(str(name).strip().lower().replace("_", " ").split())


def _lookup(kind: str, name: str, entries: dict[str, Any]) -> Any:
    key = normalise(name)
    by_name = {alias: entry for entry in entries.values() for alias in (entry.key, *entry.aliases)}
    if key in by_name:
        return by_name[key]
    close = difflib.get_close_matches(key, list(by_name), n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise CatalogError(f"unknown {kind} {name!r}{hint}; known: {', '.join(entries)}")


@lru_cache(maxsize=None)
def _read(filename: str) -> dict[str, dict]:
    text = resources.files("sim.catalog").joinpath(filename).read_text(encoding="utf-8")
    return yaml.safe_load(text)


def _known(cls: type, key: str, entry: dict) -> dict:
    """Only the keys `cls` has, with lists as tuples (the dataclasses are frozen and hashable)."""
    names = {f.name for f in fields(cls)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in entry.items() if k in names} | {"key": key}


@lru_cache(maxsize=None)
def gpus() -> dict[str, Gpu]:
    """Every GPU in the catalog, by name."""
    return {key: Gpu(**_known(Gpu, key, entry)) for key, entry in _read("gpus.yaml").items()}


@lru_cache(maxsize=None)
def models() -> dict[str, ModelShape]:
    """Every model in the catalog, by name (an entry with `shape_of` borrows another's shape)."""
    raw = _read("models.yaml")
    out = {}
    for key, entry in raw.items():
        shape = {**raw[entry["shape_of"]], **entry} if "shape_of" in entry else entry
        out[key] = ModelShape(**_known(ModelShape, key, shape))
    return out


def gpu(name: str) -> Gpu:
    """The catalog GPU called `name`; CatalogError listing the known ones otherwise."""
    return _lookup("GPU", name, gpus())


def model(name_or_path: str, base_dir: Union[str, Path, None] = None) -> ModelShape:
    """A catalog model by name, or the shape in a Hugging Face config.json (a path ending in .json).

    A relative path is taken from `base_dir` (the workload file's folder) when given.
    """
    if looks_like_path(name_or_path):
        from .hf_config import read_hf_config

        path = Path(name_or_path)
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        return read_hf_config(path)
    return _lookup("model", name_or_path, models())


def looks_like_path(name: str) -> bool:
    """A model given as a file rather than a catalog name."""
    return str(name).endswith(".json") or "/" in str(name) or "\\" in str(name)
