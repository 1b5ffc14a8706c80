"""The GPU and model catalog, the roofline derivation, its schema integration and CLI, and the check
against published vLLM figures (tests/data/vllm_published.yaml)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml

import sim
from sim.catalog import CatalogError, Efficiency, derive, gpu, gpus, model, models
from sim.cli import main
from sim.config.loader import ConfigError, load_workload
from sim.config.schema import Workload

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = yaml.safe_load((Path(__file__).parent / "data" / "vllm_published.yaml").read_text())
GIB = 2 ** 30

# --------------------------------------------------------------------------- catalog data


def test_the_catalog_has_the_gpus_and_models_asked_for():
    assert {"a10g", "l4", "l40s", "a100-40gb", "a100-80gb", "h100-sxm", "h100-pcie", "h200", "b200",
            "mi300x"} <= set(gpus())
    assert {"llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b", "llama-3.2-1b", "llama-3.2-3b", "qwen2.5-7b",
            "qwen2.5-32b", "qwen2.5-72b", "mistral-7b", "mixtral-8x7b", "deepseek-v3", "deepseek-r1"} <= set(models())


@pytest.mark.parametrize("name", list(gpus()))
def test_every_gpu_has_sources_and_plausible_numbers(name):
    g = gpu(name)
    assert g.source and all(re.search(r"https?://", s) for s in g.source)
    assert re.search(r"https?://", g.price_source) and re.search(r"20\d\d", g.price_source)
    assert 16 <= g.memory_gb <= 256
    assert 0.25 <= g.memory_bandwidth_tb_s <= 10
    assert 50 <= g.bf16_tflops <= 3000  # dense: a sparsity figure would be twice the datasheet's dense one
    assert g.fp8_tflops is None or g.fp8_tflops == pytest.approx(2 * g.bf16_tflops, rel=0.05)
    assert 32 <= g.interconnect_gb_s <= 2000
    assert 0.2 <= g.price_usd_per_hour <= 15
    # Bytes per FLOP at the ridge point: every datacenter GPU needs O(100) FLOPs per byte to be compute-bound.
    assert 50 <= g.bf16_tflops * 1e12 / g.bandwidth_bytes_s <= 1000


@pytest.mark.parametrize("name", list(models()))
def test_every_model_has_its_config_json_source_and_a_shape_that_adds_up(name):
    m = model(name)
    assert re.fullmatch(r"https://huggingface\.co/[\w.-]+/[\w.-]+/blob/main/config\.json", m.source)
    # The parameter count of the model card is what the shape adds up to (norms and biases aside).
    assert m.computed_params() == pytest.approx(m.params_b * 1e9, rel=0.01)
    if m.active_params_b is not None:
        assert m.active_params == pytest.approx(m.active_params_b * 1e9, rel=0.02)
    assert m.heads % m.kv_heads == 0 and m.layers > 0 and m.vocab > 1000 and m.max_context >= 8192


def test_deepseek_r1_shares_deepseek_v3s_shape_with_its_own_source():
    v3, r1 = model("deepseek-v3"), model("deepseek-r1")
    assert (r1.layers, r1.hidden, r1.experts, r1.kv_lora_rank, r1.dtype) == (v3.layers, v3.hidden, 256, 512, "fp8")
    assert "DeepSeek-R1" in r1.source and r1.source != v3.source


def test_lookups_ignore_case_and_separators_and_know_aliases():
    assert gpu("H100 SXM").key == gpu("h100_sxm").key == gpu("h100").key == "h100-sxm"
    assert model("Llama 3.1 8B").key == "llama-3.1-8b"


def test_an_unknown_name_is_one_line_with_a_suggestion_and_the_known_names():
    with pytest.raises(CatalogError) as err:
        gpu("h100-sxn")
    message = str(err.value)
    assert "\n" not in message and "did you mean 'h100-sxm'?" in message and "known: a10g, l4," in message
    with pytest.raises(CatalogError, match=r"unknown model 'qwen-72b' \(did you mean 'qwen2.5-72b'\?\)"):
        model("qwen-72b")


# --------------------------------------------------------------------------- shapes


def test_kv_bytes_per_token_split_replicated_and_mla():
    llama70 = model("llama-3.1-70b")
    assert llama70.kv_bytes_per_token(2, 1) == 2 * 80 * 8 * 128 * 2       # 320 KiB
    assert llama70.kv_bytes_per_token(2, 4) == 2 * 80 * 2 * 128 * 2       # 2 of the 8 KV heads per GPU
    assert llama70.kv_bytes_per_token(2, 16) == 2 * 80 * 1 * 128 * 2      # fewer KV heads than GPUs: replicated
    assert llama70.kv_bytes_per_token(1, 4) == 2 * 80 * 2 * 128           # FP8 KV
    deepseek = model("deepseek-v3")
    assert deepseek.kv_bytes_per_token(2, 1) == deepseek.kv_bytes_per_token(2, 8) == 61 * (512 + 64) * 2


def test_moe_reads_only_the_experts_a_batch_touches():
    mixtral = model("mixtral-8x7b")
    assert mixtral.experts_touched(1) == pytest.approx(2)
    assert mixtral.experts_touched(2) == pytest.approx(8 * (1 - 0.75 ** 2))
    assert mixtral.params_read(1) == pytest.approx(mixtral.active_params)
    assert mixtral.params_read(256) == pytest.approx(mixtral.streamed_params, rel=1e-9)
    dense = model("llama-3.1-8b")
    assert dense.params_read(1) == dense.params_read(256) == dense.active_params == dense.streamed_params


# --------------------------------------------------------------------------- the derivation


def test_derivation_of_llama8b_on_one_h100_by_hand():
    r = derive(gpu("h100-sxm"), model("llama-3.1-8b"))
    bandwidth = 3.35e12 * 0.80
    streamed = 8.03e9 - 128256 * 4096                     # the input embedding is a row lookup
    read = streamed * 2 / bandwidth                        # 15.01 GB per step: 5.600 ms
    compute = 2 * streamed / (989.5e12 * 0.30)             # per sequence: 50.6 us
    one = 1e-3 + 10e-6 + max(read, compute)                # 6.611 ms
    full = 1e-3 + 256 * 10e-6 + max(read, 256 * compute)   # compute-bound at 256: 16.50 ms
    assert r.per_decode_seq_s == pytest.approx((full - one) / 255, rel=1e-12)
    assert r.base_s == pytest.approx(one - (full - one) / 255, rel=1e-12)
    assert r.decode_step_s(1, 0) == pytest.approx(one, rel=1e-12)
    assert r.decode_step_s(256, 0) == pytest.approx(full, rel=1e-12)
    assert r.per_kv_token_s == pytest.approx(2 * 32 * 8 * 128 * 2 / bandwidth, rel=1e-12)
    assert r.per_prefill_token_s == pytest.approx(2 * streamed / (989.5e12 * 0.55), rel=1e-12)
    assert r.per_prefill_attention_s == pytest.approx(4 * 32 * 32 * 128 / (989.5e12 * 0.40), rel=1e-12)
    kv_bytes = 0.9 * 80 * GIB - 2 * GIB - 8.03e9 * 2
    assert r.kv_cache_tokens == math.floor(kv_bytes / 131072) == 450911
    assert r.gpus_per_replica == 1


def test_tensor_parallelism_splits_weights_and_adds_all_reduces():
    four = derive(gpu("h100-sxm"), model("llama-3.1-70b"), 4)
    comm = 2 * 80 * 2 * 0.75 * 8192 * 2 / (450e9 * 0.70)    # ring all-reduce bytes per token, one way of NVLink
    assert four.comm_s_per_token == pytest.approx(comm, rel=1e-12)
    read = (70.6e9 - 128256 * 8192) * 2 / 4 / (3.35e12 * 0.8)
    assert four.roofline_one_s == pytest.approx(1e-3 + 2 * 80 * 10e-6 + 10e-6 + comm + read, rel=1e-12)
    compute = 2 * (70.6e9 - 128256 * 8192) / (4 * 989.5e12 * 0.55)
    assert four.per_prefill_token_s == pytest.approx(compute + comm, rel=1e-12)
    assert four.kv_cache_tokens == math.floor((0.9 * 80 * GIB - 2 * GIB - 70.6e9 * 2 / 4) / 81920)
    assert four.gpus_per_replica == 4


def test_fp8_halves_the_weights_and_uses_fp8_tensor_cores_where_there_are_some():
    bf16 = derive(gpu("h100-sxm"), model("llama-3.1-8b"))
    fp8 = derive(gpu("h100-sxm"), model("llama-3.1-8b"), dtype="fp8")
    assert fp8.weights_bytes_per_gpu == bf16.weights_bytes_per_gpu / 2
    assert fp8.per_prefill_token_s == pytest.approx(bf16.per_prefill_token_s / 2, rel=1e-3)  # 1979 vs 989.5
    a100 = derive(gpu("a100-80gb"), model("llama-3.1-8b"), dtype="fp8")  # Ampere: FP8 weights on BF16 math
    assert a100.per_prefill_token_s == derive(gpu("a100-80gb"), model("llama-3.1-8b")).per_prefill_token_s
    assert derive(gpu("h200"), model("deepseek-v3"), 8).dtype == "fp8"  # the model's own format by default


def test_a_model_too_big_for_its_gpus_is_an_error_naming_what_it_needs():
    # 405.9e9 x 2 B over (0.9 x 80 - 2) GiB usable per GPU = 10.8 GPUs
    too_big = r"llama-3\.1-405b \(bf16\) does not fit on 8 x h100-sxm: .* need 11 such GPUs"
    with pytest.raises(ValueError, match=too_big):
        derive(gpu("h100-sxm"), model("llama-3.1-405b"), 8)
    assert derive(gpu("h100-sxm"), model("llama-3.1-405b"), 8, dtype="fp8").kv_cache_tokens > 100_000
    with pytest.raises(ValueError, match="deepseek-v3 \\(fp8\\) does not fit on 8 x h100-sxm"):
        derive(gpu("h100-sxm"), model("deepseek-v3"), 8)
    assert derive(gpu("h200"), model("deepseek-v3"), 8).kv_cache_tokens > 100_000
    with pytest.raises(ValueError, match="tensor_parallel 3 does not divide llama-3.1-70b's 64 attention heads"):
        derive(gpu("h100-sxm"), model("llama-3.1-70b"), 3)


def test_efficiency_factors_enter_where_documented():
    base = derive(gpu("h100-sxm"), model("llama-3.1-8b"))
    slower = derive(gpu("h100-sxm"), model("llama-3.1-8b"), efficiency=Efficiency(memory_bandwidth=0.4))
    assert slower.per_kv_token_s == pytest.approx(2 * base.per_kv_token_s)
    roomier = derive(gpu("h100-sxm"), model("llama-3.1-8b"), efficiency=Efficiency(memory_utilisation=0.95))
    assert roomier.kv_cache_tokens == math.floor((0.95 * 80 * GIB - 2 * GIB - 16.06e9) / 131072)


def test_the_schema_offers_every_efficiency_factor_in_order():
    from sim.catalog import EFFICIENCY_FIELDS
    from sim.config.roofline import RooflineEfficiency

    assert tuple(RooflineEfficiency.model_fields) == EFFICIENCY_FIELDS
    given = RooflineEfficiency(decode_compute=0.5).resolved()
    assert given == Efficiency(decode_compute=0.5) and given.memory_bandwidth == Efficiency().memory_bandwidth


def test_explain_shows_the_arithmetic_and_the_predictions():
    lines = derive(gpu("h100-sxm"), model("llama-3.1-70b"), 4).explain(1024)
    text = "\n".join(lines)
    for needle in ("per_decode_seq_s = ", "base_s = ", "per_kv_token_s = 81,920 B / 2.68 TB/s",
                   "8 KV heads / TP 4 -> 2", "all-reduce latency: 2 x 80 layers x 10 us = 1.6 ms",
                   "kv_cache_tokens 486,595", "predicted single-stream decode at 1,024 tokens",
                   "predicted full-batch decode step, 256 sequences", "gpus_per_replica = 4"):
        assert needle in text, needle


# --------------------------------------------------------------------------- Hugging Face config.json

MIXTRAL_CONFIG = {
    "architectures": ["MixtralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "num_attention_heads": 32, "num_experts_per_tok": 2,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "vocab_size": 32000,
}
DEEPSEEK_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
    "first_k_dense_replace": 3, "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
    "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "vocab_size": 129280, "max_position_embeddings": 163840, "tie_word_embeddings": False,
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]},
}


def write_config(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps(config))
    return path


def test_a_config_json_gives_the_catalogs_shape(tmp_path):
    mixtral = model(str(write_config(tmp_path / "Mixtral", MIXTRAL_CONFIG)))
    entry = model("mixtral-8x7b")
    for field in ("layers", "hidden", "intermediate", "heads", "kv_heads", "head_dim", "vocab", "experts",
                  "experts_per_token", "moe_intermediate", "max_context"):
        assert getattr(mixtral, field) == getattr(entry, field), field
    assert mixtral.total_params == pytest.approx(entry.total_params, rel=0.01)  # counted from the shape
    deepseek = model(str(write_config(tmp_path / "DeepSeek-V3", DEEPSEEK_CONFIG)))
    assert deepseek.dtype == "fp8" and deepseek.uses_mla and deepseek.dense_layers == 3
    assert deepseek.shared_expert_intermediate == 2048
    assert deepseek.total_params == pytest.approx(671e9, rel=0.01)
    assert deepseek.active_params == pytest.approx(37e9, rel=0.02)


def test_qwen_moe_keys_and_nested_text_config(tmp_path):
    qwen_moe = {"hidden_size": 2048, "intermediate_size": 5632, "moe_intermediate_size": 1408,
                "shared_expert_intermediate_size": 5632, "num_experts": 60, "num_experts_per_tok": 4,
                "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
                "vocab_size": 151936, "max_position_embeddings": 8192}
    m = model(str(write_config(tmp_path / "q", {"text_config": qwen_moe, "architectures": ["X"]})))
    assert (m.experts, m.experts_per_token, m.moe_intermediate, m.shared_expert_intermediate) == (60, 4, 1408, 5632)
    assert m.head_dim == 128  # hidden / heads when config.json has no head_dim


@pytest.mark.parametrize("content, message", [
    ("{not json", r"config\.json:1: not valid JSON"),
    ('{"hidden_size": 4096}', r"missing num_hidden_layers, num_attention_heads, intermediate_size, vocab_size"),
    (json.dumps({**MIXTRAL_CONFIG, "num_hidden_layers": "32"}), r"num_hidden_layers must be a whole number"),
])
def test_a_bad_config_json_is_one_line(tmp_path, content, message):
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(CatalogError, match=message):
        model(str(path))
    with pytest.raises(CatalogError, match="file not found"):
        model(str(tmp_path / "absent" / "config.json"))


# --------------------------------------------------------------------------- schema integration


def workload(engine: dict, **model_fields) -> dict:
    return {
        "simulation": {"duration_s": 60, "warmup_s": 0},
        "traffic": {"classes": {"c": {"arrival": {"kind": "poisson", "rate_rps": 2}, "prompt_tokens": 500,
                                      "output_tokens": 100}}},
        "models": {"m": {"kind": "self_hosted", "engine": engine, **model_fields}},
    }


def test_an_engine_with_gpu_and_model_derives_its_coefficients_capacity_and_price():
    w = Workload.model_validate(workload({"gpu": "h100-sxm", "model": "llama-3.1-70b", "tensor_parallel": 4},
                                         max_batch=128))
    m, r = w.models["m"], derive(gpu("h100-sxm"), model("llama-3.1-70b"), 4, max_batch=128)
    assert m.engine.step_time.model_dump(include=set(r.coefficients())) == r.coefficients()
    assert m.engine.kv_cache_tokens == r.kv_cache_tokens
    assert m.gpu_hourly_usd == gpu("h100-sxm").price_usd_per_hour and m.gpus_per_replica == 4
    assert m.replica_hourly_usd == pytest.approx(4 * 2.99)
    assert m.engine.roofline == r
    assert m.engine.coefficients_source() == "roofline of h100-sxm x llama-3.1-70b, TP 4, bf16 weights, auto KV"


def test_given_fields_override_the_derived_ones_field_by_field():
    w = Workload.model_validate(workload(
        {"gpu": "h100-sxm", "model": "llama-3.1-8b", "kv_cache_tokens": 100000,
         "step_time": {"base_s": 0.01, "noise_cv": 0.1}, "efficiency": {"memory_bandwidth": 0.4}},
        gpu_hourly_usd=2.0))
    m = w.models["m"]
    r = derive(gpu("h100-sxm"), model("llama-3.1-8b"), efficiency=Efficiency(memory_bandwidth=0.4))
    assert m.engine.step_time.base_s == 0.01 and m.engine.step_time.noise_cv == 0.1
    assert m.engine.step_time.per_decode_seq_s == r.per_decode_seq_s
    assert m.engine.step_time.per_kv_token_s == r.per_kv_token_s
    assert m.engine.kv_cache_tokens == 100000 and m.gpu_hourly_usd == 2.0
    assert m.engine.coefficients_source().endswith("(base_s typed in)")


def test_typed_coefficients_take_tensor_parallel_without_the_catalog():
    step = {"base_s": 0.02, "per_decode_seq_s": 1e-4, "per_prefill_token_s": 5e-5}
    m = Workload.model_validate(workload({"tensor_parallel": 4, "step_time": step}, gpu_hourly_usd=2.5)).models["m"]
    assert m.gpus_per_replica == 4 and m.replica_hourly_usd == 10.0 and m.engine.roofline is None
    assert m.engine.coefficients_source() == "typed in (step_time)"
    plain = Workload.model_validate({**workload({}), "models": {"m": {
        "kind": "self_hosted", "service_time": 1.0, "gpu_hourly_usd": 2.5}}}).models["m"]
    assert plain.gpus_per_replica == 1 and plain.replica_hourly_usd == 2.5


def test_cost_is_the_gpu_price_times_the_gpus_of_each_replica():
    step = {"base_s": 0.02, "per_decode_seq_s": 1e-4, "per_prefill_token_s": 5e-5}
    data = workload({"tensor_parallel": 2, "step_time": step}, gpu_hourly_usd=1.5, replicas=3)
    data["simulation"]["warm"] = True
    summary = sim.run(Workload.model_validate(data)).summary
    assert summary["cost_per_hour_usd"] == pytest.approx(3 * 2 * 1.5, rel=1e-9)


def write_workload(folder: Path, engine: str) -> Path:
    path = folder / "w.yaml"
    path.write_text(
        "traffic:\n  classes:\n    c:\n      arrival: {kind: poisson, rate_rps: 1}\n      prompt_tokens: 100\n"
        "      output_tokens: 50\nmodels:\n  m:\n    kind: self_hosted\n    engine:\n" + engine)
    return path


@pytest.mark.parametrize("engine, line", [
    ("      gpu: h100-sxmm\n      model: llama-3.1-8b\n",
     "w.yaml:11: models.m.engine.gpu: unknown GPU 'h100-sxmm' (did you mean 'h100-sxm'?); known: a10g,"),
    ("      gpu: a10g\n      model: llama-3.1-70b\n      tensor_parallel: 2\n",
     "w.yaml:13: models.m.engine.tensor_parallel: llama-3.1-70b (bf16) does not fit on 2 x a10g"),
    ("      gpu: a10g\n      model: models/absent.json\n", "w.yaml:12: models.m.engine.model: "),
    ("      model: llama-3.1-8b\n", "w.yaml:10: models.m.engine.gpu: required with model"),
    ("      gpu: h100-sxm\n      model: llama-3.1-8b\n      efficiency: {decode_compute: 2}\n",
     "w.yaml:13: models.m.engine.efficiency.decode_compute: must be less than or equal to 1"),
])
def test_catalog_errors_in_a_workload_name_file_line_and_field(tmp_path, engine, line):
    with pytest.raises(ConfigError) as err:
        load_workload(write_workload(tmp_path, engine))
    assert len(err.value.lines) == 1 and err.value.lines[0].startswith(str(tmp_path / line.split(":")[0]))
    assert err.value.lines[0].split("w.yaml", 1)[1].startswith(line.split("w.yaml", 1)[1])


def test_a_config_json_path_is_read_relative_to_the_workload(tmp_path):
    write_config(tmp_path / "models" / "mixtral", MIXTRAL_CONFIG)
    w = load_workload(write_workload(tmp_path, "      gpu: h100-sxm\n      model: models/mixtral/config.json\n"
                                               "      tensor_parallel: 2\n"))
    assert w.models["m"].engine.roofline.model.experts == 8


# --------------------------------------------------------------------------- CLI


def test_llmsim_catalog_lists_every_gpu_and_model(capsys):
    assert main(["catalog"]) == 0
    out = capsys.readouterr().out
    for name in [*gpus(), *models()]:
        assert re.search(rf"^{re.escape(name)}\s", out, re.M), name
    assert main(["catalog", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["gpus"]["h100-sxm"]["memory_bandwidth_tb_s"] == 3.35
    assert listing["models"]["deepseek-v3"]["kv_lora_rank"] == 512


def test_llmsim_catalog_explain_prints_the_derivation(capsys):
    assert main(["catalog", "--explain", "h100-sxm", "llama-3.1-70b", "4", "--context", "2048"]) == 0
    out = capsys.readouterr().out
    assert "per_kv_token_s = 81,920 B" in out and "at 2,048 tokens of context" in out
    assert main(["catalog", "--explain", "h100-sxm", "llama-3.1-8b", "--dtype", "fp8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = derive(gpu("h100-sxm"), model("llama-3.1-8b"), dtype="fp8")
    assert result["step_time"] == expected.coefficients() and result["kv_cache_tokens"] == expected.kv_cache_tokens
    assert result["dtype"] == "fp8" and result["gpus_per_replica"] == 1 and result["explanation"]


@pytest.mark.parametrize("args, message", [
    (["h100-sxn", "llama-3.1-8b"], "unknown GPU 'h100-sxn' (did you mean 'h100-sxm'?)"),
    (["h100-sxm", "llama-3.1-405b"], "does not fit on 1 x h100-sxm"),
    (["h100-sxm"], "--explain takes GPU MODEL [TP]"),
    (["h100-sxm", "llama-3.1-8b", "four"], "--explain takes GPU MODEL [TP]"),
])
def test_llmsim_catalog_bad_names_exit_2_with_one_line(capsys, args, message):
    assert main(["catalog", "--explain", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


# --------------------------------------------------------------------------- published vLLM figures


def simulate_benchmark(case: dict, folder: Path) -> float:
    """The benchmark through the engine: output tokens/s of a throughput run, or 1 / TPOT of a lone request."""
    roofline = derive(gpu(case["gpu"]), model(case["model"]), case["tensor_parallel"], max_batch=case["max_batch"])
    prompts = 1 if case["kind"] == "single_stream" else case["prompts"]
    row = f"0,{case['prompt_tokens']},{case['output_tokens']}\n"
    (folder / "bench.csv").write_text("time,prompt_tokens,output_tokens\n" + row * prompts)
    data = {
        "simulation": {"duration_s": 1, "warmup_s": 0},
        "traffic": {"classes": {"bench": {"arrival": {"kind": "trace", "format": "csv", "path": "bench.csv",
                                                      "end_s": 1}}}},  # every request at t = 0
        "models": {"m": {"kind": "self_hosted", "max_batch": case["max_batch"], "engine": {
            "gpu": case["gpu"], "model": case["model"], "tensor_parallel": case["tensor_parallel"],
            "max_batch_tokens": case["max_batch_tokens"]}}},
    }
    w = Workload.model_validate(data, context={"base_dir": str(folder)})
    assert w.models["m"].engine.roofline == roofline
    requests = sim.run(w).requests
    if case["kind"] == "single_stream":
        return 1.0 / float(requests["tpot_s"].iloc[0])
    return prompts * case["output_tokens"] / float(requests["end_s"].max())


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_roofline_defaults_land_near_published_vllm_figures(tmp_path, name):
    case = PUBLISHED[name]
    assert case["source"].startswith("https://") and case["setup"]
    predicted = simulate_benchmark(case, tmp_path)
    assert predicted == pytest.approx(case["published"], rel=case["tolerance"]), (
        f"{name}: simulated {predicted:,.1f} tokens/s vs published {case['published']:,.1f}")
