"""A model shape from a Hugging Face `config.json` (the file every model repository carries).

Reads the standard keys of decoder-only models (Llama, Mistral, Qwen2, ...) and the
mixture-of-experts keys of Mixtral (`num_local_experts`), Qwen-MoE (`num_experts`,
`moe_intermediate_size`, `shared_expert_intermediate_size`) and DeepSeek-V2/V3
(`n_routed_experts`, `n_shared_experts`, `first_k_dense_replace`, and MLA's
`kv_lora_rank`, `q_lora_rank`, `qk_nope_head_dim`, `qk_rope_head_dim`,
`v_head_dim`). Every MoE model is taken to route in all layers after its first
`first_k_dense_replace` (Qwen-MoE's `decoder_sparse_step` and `mlp_only_layers`
are not modelled). The parameter count is computed from the shape.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .catalog import CatalogError, ModelShape

_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
MAX_CONFIG_BYTES = 16 * 2**20  # far above any real config.json, far below trouble


def read_hf_config(path: Path) -> ModelShape:
    """The shape of the model whose config.json is at `path`; CatalogError (one line) if it cannot be read."""
    config = _load(path)
    missing = [key for key in _REQUIRED if key not in config]
    if missing:
        raise CatalogError(f"{path}: not a decoder-only model's config.json: missing {', '.join(missing)}")
    try:
        return ModelShape(key=path.parent.name or path.stem, name=str(config.get("_name_or_path") or path),
                          source=str(path), **_dense_keys(config), **_moe_keys(config), **_mla_keys(config))
    except (TypeError, ValueError) as err:
        raise CatalogError(f"{path}: {err}") from None


def _load(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(_read_small(path))
    except FileNotFoundError:
        raise CatalogError(f"{path}: file not found") from None
    except OSError as err:
        raise CatalogError(f"{path}: cannot read: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise CatalogError(f"{path}: not a text file (a config.json is UTF-8 JSON)") from None
    except json.JSONDecodeError as err:
        raise CatalogError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from None
    if not isinstance(config, dict):
        raise CatalogError(f"{path}: expected a JSON object of config keys")
    # Multimodal repositories nest the language model's keys (e.g. Llama 4, Qwen2-VL's text_config).
    return config.get("text_config", config) if isinstance(config.get("text_config"), dict) else config


def _read_small(path: Path) -> str:
    """The text of a regular file of at most MAX_CONFIG_BYTES: a device such as /dev/zero would never end."""
    if path.exists() and not path.is_file():
        raise CatalogError(f"{path}: not a regular file (a folder or a device)")
    with path.open("rb") as fh:
        raw = fh.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise CatalogError(f"{path}: larger than {MAX_CONFIG_BYTES // 2**20} MiB; a model's config.json is a few KiB")
    return raw.decode("utf-8")


def _whole(config: dict[str, Any], key: str, default: Any = None) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} must be a whole number >= 0, got {value!r}")
    return value


def _dense_keys(config: dict[str, Any]) -> dict[str, Any]:
    hidden, heads = _whole(config, "hidden_size"), _whole(config, "num_attention_heads")
    if heads == 0:
        raise ValueError("num_attention_heads must be at least 1")
    return {
        "layers": _whole(config, "num_hidden_layers"),
        "hidden": hidden,
        "intermediate": _whole(config, "intermediate_size"),
        "heads": heads,
        "kv_heads": _whole(config, "num_key_value_heads", heads),
        "head_dim": _whole(config, "head_dim", None) if config.get("head_dim") else hidden // heads,
        "vocab": _whole(config, "vocab_size"),
        "max_context": _whole(config, "max_position_embeddings", 0),
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        "dtype": _native_dtype(config),
    }


def _native_dtype(config: dict[str, Any]) -> str:
    """fp8 for FP8-quantised releases (DeepSeek-V3), fp16 or bf16 otherwise."""
    quant = config.get("quantization_config") or {}
    if isinstance(quant, dict) and quant.get("quant_method") == "fp8":
        return "fp8"
    return "fp16" if config.get("torch_dtype") == "float16" else "bf16"


def _moe_keys(config: dict[str, Any]) -> dict[str, Any]:
    experts = next((config[k] for k in ("num_local_experts", "num_experts", "n_routed_experts") if config.get(k)), 0)
    if not experts:
        return {}
    width = config.get("moe_intermediate_size") or config["intermediate_size"]  # Mixtral: experts are full MLPs
    shared = config.get("shared_expert_intermediate_size") or (config.get("n_shared_experts") or 0) * width
    return {
        "experts": _whole({"experts": experts}, "experts"),
        "experts_per_token": _whole(config, "num_experts_per_tok", 2),
        "moe_intermediate": _whole({"moe_intermediate_size": width}, "moe_intermediate_size"),
        "shared_expert_intermediate": _whole({"shared": shared}, "shared"),
        "dense_layers": _whole(config, "first_k_dense_replace", 0),
    }


def _mla_keys(config: dict[str, Any]) -> dict[str, Any]:
    if not config.get("kv_lora_rank"):
        return {}
    keys = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
    out = {key: _whole(config, key) for key in keys}
    out["q_lora_rank"] = _whole(config, "q_lora_rank", 0) if config.get("q_lora_rank") else 0
    return out
