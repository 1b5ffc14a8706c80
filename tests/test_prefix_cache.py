"""Automatic prefix caching of replayed prompts' block ids, per replica, and prefix-affinity dispatch."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import sim
from sim.config.schema import BlockPrefixCache, Workload
from sim.model.pipeline import simulate
from sim.model.serving.block_cache import BlockCache

ROOT = Path(__file__).resolve().parent.parent
MOONCAKE = ROOT.parent / "shared" / "data" / "mooncake_conversation_trace.jsonl"
needs_data = pytest.mark.skipif(not MOONCAKE.is_file(), reason="needs ../shared/data (the Mooncake trace)")


def test_only_the_leading_run_of_cached_blocks_counts_and_the_oldest_go_first():
    cache = BlockCache(BlockPrefixCache(blocks=3))
    assert cache.admit([1, 2]) == 0
    assert cache.admit([1, 3]) == 1          # 1 hits; 3 is new
    assert cache.admit([9, 2]) == 0          # 2 is cached, but after a miss it is another prefix
    assert len(cache) == 3                   # 1, 2, 3, 9 held 3: 1 (least recently used) went first
    assert cache.leading_hits([1]) == 0 and cache.leading_hits([3, 9, 2]) == 3


def mooncake_workload(tmp_path: Path, rows, replicas=1, dispatch="least_loaded", blocks=1000) -> Workload:
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(dict(zip(("timestamp", "input_length", "output_length", "hash_ids"), row)))
                            + "\n" for row in rows))
    engine = {"max_batch_tokens": 2000, "prefix_cache": {"blocks": blocks},
              "step_time": {"base_s": 0.01, "per_decode_seq_s": 0.0, "per_prefill_token_s": 0.0001}}
    return Workload.model_validate({
        "simulation": {"duration_s": 100},
        "traffic": {"classes": {"c": {"arrival": {"kind": "trace", "format": "mooncake", "path": str(path)},
                                      "prompt_tokens": 10, "output_tokens": 1}}},
        "models": {"m": {"kind": "self_hosted", "replicas": replicas, "max_batch": 4, "dispatch": dispatch,
                         "engine": engine}},
    })


def test_a_shared_prefix_skips_its_prefill_by_hand(tmp_path):
    # R0 prefills 1500 tokens: 10 + 150 ms. R1 shares blocks 1 and 2 (1024 tokens): it prefills 476,
    # 10 + 47.6 ms. R2 shares nothing (block 7 first): 1500 tokens again.
    rows = [(0, 1500, 1, [1, 2, 3]), (10_000, 1500, 1, [1, 2, 4]), (20_000, 1500, 1, [7, 2, 3])]
    rec = simulate(mooncake_workload(tmp_path, rows))
    ttft = [f - a for f, a in zip(rec.first_token, rec.arrival)]
    assert ttft == pytest.approx([0.16, 0.0576, 0.16])
    assert [rec.cached_tokens[i] for i in range(3)] == [(0, 1500), (1024, 476), (0, 1500)]


def test_prefix_affinity_sends_a_request_where_its_prefix_is(tmp_path):
    # Two replicas; R0 lands on replica 0. R1 (at 1 s, both idle) shares R0's prefix: least-loaded
    # dispatch picks the first replica anyway; send R2 while R1 runs so that the choice matters.
    rows = [(0, 1500, 1, [1, 2, 3]), (1_000, 1500, 300, [5, 6, 7]), (1_010, 1500, 1, [5, 6, 8])]
    plain = simulate(mooncake_workload(tmp_path, rows, replicas=2))
    affine = simulate(mooncake_workload(tmp_path, rows, replicas=2, dispatch="prefix_affinity"))
    # Least loaded: R2 goes to the idle replica 1 and finds nothing; by affinity it joins R1 on replica 0.
    assert plain.replica == [0, 0, 1] and plain.cached_tokens[2] == (0, 1500)
    assert affine.replica == [0, 0, 0] and affine.cached_tokens[2] == (1024, 476)


def test_prefix_affinity_needs_a_prefix_cache():
    from sim.config.loader import ConfigError

    with pytest.raises(ConfigError, match="--set models.llama8b.dispatch: prefix_affinity needs engine.prefix_cache"):
        sim.load_workload(ROOT / "workloads/chat-selfhosted.yaml", ["models.llama8b.dispatch=prefix_affinity"])


@needs_data
def test_one_replica_with_room_for_everything_reads_every_repeated_leading_block():
    # Computed from the trace alone: each prompt's leading blocks seen in an earlier prompt, x 512 tokens
    # (at most all but its last token). One replica admits requests in arrival order, so the simulated
    # cache must read exactly that many tokens.
    rows = [json.loads(line) for line in MOONCAKE.read_text().splitlines()]
    rows = [r for r in rows if r["timestamp"] < 600_000]
    seen, read, prompt = set(), 0, 0
    for r in rows:
        run = 0
        for block in r["hash_ids"]:
            if block not in seen:
                break
            run += 1
        read += min(run * 512, r["input_length"] - 1)
        prompt += r["input_length"]
        seen.update(r["hash_ids"])
    summary = sim.run(ROOT / "workloads/mooncake-replay.yaml", replications=1, keep_requests=False, overrides=[
        "simulation.duration_s=600", "simulation.warmup_s=0", "models.llama8b.replicas=1",
        "models.llama8b.engine.prefix_cache.blocks=10000000", "models.llama8b.engine.kv_cache_tokens=100000000"]).summary
    assert summary["requests_arrived"] == len(rows)
    assert summary["prompt_cached_share"] == pytest.approx(read / prompt, rel=1e-12)


@needs_data
def test_prefix_affinity_keeps_prefixes_together_on_the_real_trace():
    base = ["simulation.duration_s=1200", "models.llama8b.engine.prefix_cache.blocks=100000"]
    affine = sim.run(ROOT / "workloads/mooncake-replay.yaml", keep_requests=False, overrides=base).summary
    plain = sim.run(ROOT / "workloads/mooncake-replay.yaml", keep_requests=False,
                    overrides=base + ["models.llama8b.dispatch=least_loaded"]).summary
    # Three replicas: least loaded spreads a conversation's turns, affinity keeps them where their prefix is.
    assert affine["prompt_cached_share"] > plain["prompt_cached_share"] + 0.1
    assert affine["ttft_p50_s"] < plain["ttft_p50_s"]
