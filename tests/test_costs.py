"""Every stage's cost, the batch API and scale to zero: hand-computed bills and timelines, the ledger
reconciling with the summary in every shipped workload, and the batch price against LiteLLM's table."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from test_traces import SHARED, needs_shared_data

import sim
from sim.config.schema import Workload
from sim.config.serving import BATCH_PRICE_MULTIPLIER
from sim.metrics.ledger import STAGES, ledger
from sim.metrics.recorder import Recorder
from sim.metrics.summary import choose_warmup, metric_names, summarise
from sim.model.application.caches import BYPASS
from sim.model.pipeline import simulate

ROOT = Path(__file__).resolve().parent.parent


def trace(tmp_path: Path, times: list[float], end_s: float) -> dict:
    """Arrivals at exactly `times` (a replayed trace), measured up to `end_s`."""
    path = tmp_path / "t.csv"
    path.write_text("time,prompt_tokens,output_tokens\n" + "".join(f"{t!r},1,1\n" for t in times))
    return {"kind": "trace", "format": "csv", "path": str(path), "end_s": end_s}


def one_class(tmp_path: Path, times: list[float], model: dict, duration: float = 1000.0, warm: bool = True,
              **extra) -> Workload:
    """Requests of one class at `times` to endpoint m; warm: replicas up at the start (and caches full)."""
    return Workload.model_validate({
        "simulation": {"duration_s": duration, "warm": warm},
        "traffic": {"classes": {"c": {"arrival": trace(tmp_path, times, duration), "prompt_tokens": 1,
                                      "output_tokens": 1}}},
        "models": {"m": model}, **extra})


def costs(rec, workload: Workload, warmup: float = 0.0) -> tuple[dict, float]:
    """The summary, and the ledger's total over the summary's window."""
    m = summarise(rec, workload, warmup)
    return m, float(ledger(rec, workload, (warmup, workload.measure_end_s()))["usd"].sum())


# ------------------------------------------------------------------------------ scale to zero

IDLE = {"idle_s": 300, "cold_start_s": 20}


def test_a_serverless_api_after_idling_waits_exactly_its_cold_start(tmp_path):
    # 1 s per request. 0 -> 1; 100 -> 101 and 350 -> 351 (idle 99 s and 249 s: still up); empty from 351,
    # asleep at 651; the request at 800 waits the 20 s cold start: admitted at 820, done at 821.
    api = {"kind": "api", "concurrency": 4, "service_time": 1.0, "scale_to_zero": IDLE}
    rec = simulate(one_class(tmp_path, [0.0, 100.0, 350.0, 800.0], api))
    assert rec.admit == [0.0, 100.0, 350.0, 820.0]
    assert rec.end == [1.0, 101.0, 351.0, 821.0]
    # Requests arriving during the cold start wait for it too, and then run side by side.
    rec = simulate(one_class(tmp_path, [0.0, 500.0, 505.0, 530.0], api))
    assert rec.admit == [0.0, 520.0, 520.0, 530.0] and rec.end == [1.0, 521.0, 521.0, 531.0]


ENGINE = {"step_time": {"base_s": 1.0, "per_decode_seq_s": 0.0, "per_prefill_token_s": 0.0}}
REPLICA = {"kind": "self_hosted", "replicas": 1, "max_batch": 4, "gpu_hourly_usd": 3.6, "engine": ENGINE,
           "scale_to_zero": IDLE}


@pytest.mark.parametrize("autoscale", [None, {"min_replicas": 1, "max_replicas": 3, "target": 0.5}])
def test_a_scaled_to_zero_replica_stops_billing_and_the_next_request_waits_its_load(tmp_path, autoscale):
    # One 1 s step per request. The replica serves 0 -> 1 and 100 -> 101, idles from 101 and stops at 401
    # (held 401 s). The request at 500 starts a replica that loads for 20 s: served 520 -> 521; it stops at
    # 821 (held 321 s). 722 replica-seconds at $3.60/h: $0.722, in the summary and the ledger alike. The
    # autoscaler (little load: its minimum, 1) adds nothing while the endpoint sleeps.
    model = dict(REPLICA, autoscale=autoscale) if autoscale else REPLICA
    workload = one_class(tmp_path, [0.0, 100.0, 500.0], model)
    rec = simulate(workload)
    assert rec.admit == [0.0, 100.0, 520.0] and rec.end == [1.0, 101.0, 521.0]
    held = {t: gauges["m"][1] for t, gauges in rec.gauges}
    assert held[400.0] == 1 and held[410.0] == held[490.0] == 0 and held[500.0] == held[820.0] == 1
    assert held[830.0] == held[1000.0] == 0
    assert rec.samples[-1][1]["m"][3] == pytest.approx(722.0)
    m, book = costs(rec, workload)
    assert m["cost_total_usd"] == pytest.approx(0.722) and book == pytest.approx(0.722)


def test_an_endpoint_never_used_sleeps_after_idle_s_from_the_start(tmp_path):
    # Two endpoints; nothing is sent to "spare": it stops at 300 s (billed 300 s of 1,000), and its bill,
    # used by no call, is shared evenly among the window's requests in the ledger.
    workload = Workload.model_validate({
        "simulation": {"duration_s": 1000, "warm": True},
        "traffic": {"classes": {"c": {"arrival": trace(tmp_path, [0.0, 10.0], 1000), "prompt_tokens": 1,
                                      "output_tokens": 1, "endpoint": "m"}}},
        "models": {"m": dict(REPLICA, scale_to_zero=None), "spare": REPLICA}})
    rec = simulate(workload)
    assert rec.samples[-1][1]["spare"][3] == pytest.approx(300.0)
    book = ledger(rec, workload)
    spare = book[book["resource"] == "spare"]
    assert spare["request"].tolist() == [0, 1] and spare["usd"].tolist() == pytest.approx([0.15, 0.15])
    assert book["usd"].sum() == pytest.approx(3.6 * 1300 / 3600)


def test_scale_to_zero_needs_an_engine_on_self_hosted():
    with pytest.raises(ValidationError, match="scale_to_zero need an engine"):
        Workload.model_validate({
            "traffic": {"classes": {"c": {"arrival": {"kind": "poisson", "rate_rps": 1}, "prompt_tokens": 1,
                                          "output_tokens": 1}}},
            "models": {"m": {"kind": "self_hosted", "service_time": 1.0, "scale_to_zero": IDLE}}})


# ------------------------------------------------------------------------------ batch API

GPT = {"kind": "api", "concurrency": 64, "service_time": 2.0, "price_per_mtok_in": 2.5, "price_per_mtok_out": 10.0}


def mixed(batch: dict, duration: float = 600.0) -> Workload:
    """Interactive chat at 2/s and a batch backfill at 5/s on one API, 1,000 tokens in and 200 out each."""
    tokens = {"prompt_tokens": 1000, "output_tokens": 200}
    return Workload.model_validate({
        "simulation": {"duration_s": duration, "seed": 3},
        "traffic": {"classes": {"chat": {"arrival": {"kind": "poisson", "rate_rps": 2}, **tokens},
                                "backfill": {"arrival": {"kind": "poisson", "rate_rps": 5}, **tokens, "batch": True}}},
        "models": {"gpt": dict(GPT, batch=batch)}})


def test_batch_requests_pay_the_batch_price_and_their_latency_is_reported_apart():
    workload = mixed({"completion_window_s": 3600})
    rec = simulate(workload)
    m, book = costs(rec, workload)
    # $0.0045 a request (1,000 x $2.50 + 200 x $10 per million), half that through the batch mode.
    cls = np.asarray(rec.cls)
    chats, batches = float((cls == 0).sum()), float((cls == 1).sum())
    assert m["batch_requests"] == batches > 2500
    assert m["cost_batch_usd"] == pytest.approx(batches * 0.00225)
    assert m["cost_total_usd"] == m["cost_model_usd"] == pytest.approx(chats * 0.0045 + batches * 0.00225)
    assert book == pytest.approx(m["cost_total_usd"], abs=0.005)
    rows = ledger(rec, workload)
    assert rows.groupby("class", observed=True)["batch"].all().to_dict() == {"chat": False, "backfill": True}
    # The interactive figures are the chat's alone: 2 s each, never queued (2/s x 2 s on 64 slots); the
    # batch lane holds none of the 64 slots. Batch answers come uniformly within the hour.
    assert m["e2e_p99_s"] == pytest.approx(2.0) and m["e2e_p99_s"] == m["e2e_p99_chat_s"]
    assert m["utilisation_gpt"] == pytest.approx(chats * 2.0 / 64 / 600, rel=0.01)
    assert m["batch_e2e_p50_s"] == pytest.approx(1800, rel=0.05) and m["batch_e2e_max_s"] <= 3600
    assert m["batch_within_window_share"] == 1.0
    assert set(metric_names(workload)) >= set(m) - {"offered_utilisation_gpt"}


def test_the_batch_queue_limit_holds_the_rest_on_our_side(tmp_path):
    # One request in flight at a time, each answered 10 s after acceptance: arrivals at 0, 1 and 2 are
    # answered at 10, 20 and 30 (the last waited 18 s on our side). With a 25 s window, the third is late.
    workload = Workload.model_validate({
        "simulation": {"duration_s": 100},
        "traffic": {"classes": {"c": {"arrival": trace(tmp_path, [0.0, 1.0, 2.0], 100), "prompt_tokens": 1,
                                      "output_tokens": 1, "batch": True}}},
        "models": {"m": dict(GPT, batch={"turnaround_s": 10.0, "max_in_flight": 1, "completion_window_s": 25})}})
    rec = simulate(workload)
    assert rec.admit == [0.0, 10.0, 20.0] and rec.end == [10.0, 20.0, 30.0]
    assert rec.first_token == rec.end  # no streaming
    m = summarise(rec, workload, 0.0)
    assert m["batch_within_window_share"] == pytest.approx(2 / 3)
    assert np.isnan(m["e2e_p50_s"])  # no interactive request at all


def test_a_batch_class_needs_a_batch_mode_and_no_time_limits():
    base = mixed({"completion_window_s": 3600}).model_dump(mode="json", exclude_none=True)
    base["models"]["gpt"].pop("batch")
    with pytest.raises(ValidationError, match="models.gpt has no batch mode"):
        Workload.model_validate(base)
    base["models"]["gpt"]["batch"] = {}
    base["pipeline"] = {"guardrails": {"max_time_s": 60}}
    with pytest.raises(ValidationError, match="guardrails.max_time_s would stop batch requests"):
        Workload.model_validate(base)


@needs_shared_data
def test_the_batch_price_multiplier_is_litellms():
    # The default is the median of LiteLLM's batch over interactive prices, gpt-4o's among them.
    with open(SHARED / "litellm_prices_chat_embedding_subset.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["mode"] == "chat" and r["input_cost_per_token_batches"]]
    ratios = [float(r["input_cost_per_token_batches"]) / float(r["input_cost_per_token"]) for r in rows
              if float(r["input_cost_per_token"]) > 0]
    assert len(ratios) > 400 and np.median(ratios) == pytest.approx(BATCH_PRICE_MULTIPLIER)
    gpt4o = next(r for r in rows if r["model"] == "gpt-4o")
    for kind in ("input", "output"):
        assert float(gpt4o[f"{kind}_cost_per_token_batches"]) == pytest.approx(
            BATCH_PRICE_MULTIPLIER * float(gpt4o[f"{kind}_cost_per_token"]))


# ------------------------------------------------------------------------------ the application's stages

def retrieving(tmp_path: Path, times: list[float], retrieval: dict, **pipeline) -> Workload:
    model = {"kind": "api", "concurrency": 16, "service_time": 1.0}
    return one_class(tmp_path, times, model, duration=100.0, warm=False, pipeline={"retrieval": retrieval, **pipeline})


BACKENDS = {"vector": {"concurrency": 8, "latency_s": 0.05, "price_per_query_usd": 0.001},
            "web": {"concurrency": 8, "latency_s": 0.2, "price_per_query_usd": 0.005}}


def test_per_unit_prices_go_to_the_requests_that_used_them(tmp_path):
    # Each request embeds one query of 500 tokens at $0.13 per million (text-embedding-3-large) and makes
    # two vector hops and one web hop: 500 x 0.13e-6 + 2 x 0.001 + 0.005 = $0.007065 a request.
    retrieval = {"embedding": {"price_per_mtok": 0.13, "query_tokens": 500}, "backends": BACKENDS,
                 "stages": [["vector", "web"], ["vector"]]}
    workload = retrieving(tmp_path, [0.0, 1.0, 2.0], retrieval)
    rec = simulate(workload)
    book = ledger(rec, workload)
    per = book.groupby(["request", "stage"], observed=True)["usd"].sum().unstack()
    assert per["embedding"].tolist() == pytest.approx([500 * 0.13e-6] * 3)
    assert per["backend"].tolist() == pytest.approx([0.007] * 3)
    assert book[book["stage"] == "embedding"]["tokens_in"].tolist() == [500] * 3
    m, total = costs(rec, workload)
    assert m["cost_embedding_usd"] == pytest.approx(3 * 500 * 0.13e-6)
    assert m["cost_backend_usd"] == pytest.approx(3 * 0.007)
    assert m["cost_total_usd"] == pytest.approx(3 * 0.007065) and total == pytest.approx(m["cost_total_usd"])


def test_hourly_bills_are_shared_by_use(tmp_path):
    # A retrieval cache of one question: the first request misses and runs the hops; the next two hit and
    # make none. The vector DB's $36/h over the 100 s window ($1) lands on the first request alone; the
    # cache server's $3.60/h ($0.10) is shared by lookups, a third each. The web search is unused: its
    # bill (an idle resource) is shared evenly.
    backends = {"vector": dict(BACKENDS["vector"], price_per_query_usd=0.0, hourly_usd=36.0),
                "web": dict(BACKENDS["web"], price_per_query_usd=0.0, hourly_usd=7.2)}
    retrieval = {"backends": backends, "stages": [["vector"]],
                 "cache": {"capacity": 1, "keys": {"universe": 1}, "hourly_usd": 3.6}}
    workload = retrieving(tmp_path, [0.0, 5.0, 10.0], retrieval)
    rec = simulate(workload)
    book = ledger(rec, workload)
    usd = book.groupby(["resource", "request"])["usd"].sum()
    assert usd["vector"].to_dict() == pytest.approx({0: 1.0})
    assert usd["retrieval"].to_dict() == pytest.approx({0: 0.1 / 3, 1: 0.1 / 3, 2: 0.1 / 3})
    assert usd["web"].to_dict() == pytest.approx({0: 0.2 / 3, 1: 0.2 / 3, 2: 0.2 / 3})
    m, total = costs(rec, workload)
    assert m["cost_backend_usd"] == pytest.approx(1.2) and m["cost_cache_usd"] == pytest.approx(0.1)
    assert total == pytest.approx(m["cost_total_usd"]) == pytest.approx(1.3)
    # Over a window from 50 s (no request arrives in it) the bills of 50 s are nobody's: one row, request -1.
    late = ledger(rec, workload, (50.0, 100.0))
    assert late["request"].tolist() == [-1, -1, -1]
    assert late["usd"].sum() == pytest.approx(summarise(rec, workload, 50.0)["cost_total_usd"]) == pytest.approx(0.65)


def test_an_output_cache_server_is_billed_to_its_lookups_only(tmp_path):
    # Only deterministic requests look up the output cache: the others never pay for it.
    cache = {"capacity": 10, "keys": {"universe": 1000}, "deterministic_share": 0.5, "hourly_usd": 36.0}
    workload = Workload.model_validate({
        "simulation": {"duration_s": 100, "seed": 2},
        "traffic": {"classes": {"c": {"arrival": {"kind": "poisson", "rate_rps": 5}, "prompt_tokens": 10,
                                      "output_tokens": 10}}},
        "models": {"m": {"kind": "api", "concurrency": 64, "service_time": 0.5}},
        "pipeline": {"output_cache": cache}})
    rec = simulate(workload)
    book = ledger(rec, workload)
    looked = {i for i, code in Recorder.rows(rec.cache_code, 2, np.int64).tolist() if code != BYPASS}
    paid = set(book[book["stage"] == "cache"]["request"])
    assert paid == looked and 0.3 * len(rec.arrival) < len(paid) < 0.7 * len(rec.arrival)
    assert book["usd"].sum() == pytest.approx(1.0)


def test_a_priced_embedding_needs_its_query_tokens():
    from sim.config.retrieval import EmbeddingSpec

    with pytest.raises(ValidationError, match="price_per_mtok needs query_tokens"):
        EmbeddingSpec.model_validate({"price_per_mtok": 0.02})


# ------------------------------------------------------------------------------ reconciliation

WORKLOADS = sorted((ROOT / "workloads").glob("*.yaml"))


def shipped(path: Path):
    """A shipped workload as a test parameter; the trace replays need ../shared/data (skipped without it)."""
    needs = "replay" in path.stem
    marks = [pytest.mark.needs_shared_data,
             pytest.mark.skipif(not SHARED.is_dir(), reason=f"public reference data not found at {SHARED}")]
    return pytest.param(path, [], id=path.stem, marks=marks if needs else [])
PRICED = ["pipeline.retrieval.embedding.price_per_mtok=0.02", "pipeline.retrieval.embedding.query_tokens=60",
          "pipeline.retrieval.embedding.hourly_usd=0.4", "pipeline.retrieval.embedding.cache.hourly_usd=0.1",
          "pipeline.retrieval.backends.vector.hourly_usd=1.2",
          "pipeline.retrieval.backends.orders_sql.price_per_query_usd=0.0001", "pipeline.output_cache.hourly_usd=0.2"]


@pytest.mark.parametrize("path, extra", [shipped(p) for p in WORKLOADS]
                         + [pytest.param(ROOT / "workloads/rag-support.yaml", PRICED, id="rag-support-priced")])
def test_the_ledger_reconciles_with_the_summary_to_the_cent(path, extra):
    # Over the summary's window (warm-up cut, to the end of arrivals) every dollar lands on a ledger row.
    workload = sim.load_workload(path, ["simulation.duration_s=300", "simulation.warmup_s=60", *extra])
    rec = simulate(workload)
    m, total = costs(rec, workload, choose_warmup(rec, workload))
    assert round(total, 2) == round(m["cost_total_usd"], 2) and total == pytest.approx(m["cost_total_usd"], rel=1e-9)
    if "cost_model_usd" in m:  # priced stages: the breakdown adds up to the total (agent-tools: its tools)
        parts = sum(m[f"cost_{stage}_usd"] for stage in STAGES)
        assert parts == pytest.approx(m["cost_total_usd"])
    if extra:
        assert min(m["cost_embedding_usd"], m["cost_cache_usd"]) > 0
    if path.stem == "agent-tools":
        assert m["cost_tool_usd"] > 0
