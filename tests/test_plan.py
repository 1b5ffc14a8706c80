"""`llmsim plan`: its answer against brute force, its pruning against brute force, resume, bad input, the report.

Brute force here is written apart from the search: every candidate at every replica count, each run once with
the plan's seed, the SLO judged by `slo_verdict`, the cheapest meeting it kept (ties: more headroom, then the
candidate listed first, as the plan ranks).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.cli import main
from sim.config.loader import ConfigError
from sim.experiments.plan.planner import deployment, dry_run, make_plan
from sim.experiments.plan.search import bounds, fewest_meeting, headroom, served_share
from sim.experiments.plan.spec import load_plan
from sim.experiments.run import run
from sim.experiments.spec import slo_verdict

ROOT = Path(__file__).resolve().parent.parent

WORKLOAD = """\
version: 1
name: chat-short
simulation: {duration_s: 600, warmup_s: 60, seed: 1, replications: 3}
traffic:
  classes:
    chat:
      arrival: {kind: poisson, rate_rps: 5.5}
      prompt_tokens: {kind: lognormal, median: 1020, p95: 4083}
      output_tokens: {kind: lognormal, median: 129, p95: 451}
models:
  llama8b:
    kind: self_hosted
    replicas: 1
    engine: {gpu: h100-sxm, model: llama-3.1-8b, max_batch_tokens: 8192, step_time: {noise_cv: 0.05}}
"""

APIS = """\
apis:
  small:
    kind: api
    concurrency: 64
    ttft_s: {kind: lognormal, median: 0.45, p95: 1.2}
    output_tokens_per_s: {kind: normal, mean: 85, sd: 20}
    price_per_mtok_in: 0.15
    price_per_mtok_out: 0.60
  large:
    kind: api
    concurrency: 64
    ttft_s: {kind: lognormal, median: 0.5, p95: 1.3}
    output_tokens_per_s: {kind: normal, mean: 75, sd: 20}
    price_per_mtok_in: 0.40
    price_per_mtok_out: 1.60
"""


def write_plan(folder: Path, body: str, apis: bool = True) -> Path:
    (folder / "workload.yaml").write_text(WORKLOAD)
    path = folder / "plan.yaml"
    path.write_text("version: 1\nkind: plan\nworkload: workload.yaml\n" + body + (APIS if apis else ""))
    return path


SMALL_SPACE = """\
target: 3.0
slo: {ttft_p95_s: 1.5, e2e_p99_s: 15.0}
self_hosted:
  model: llama-3.1-8b
  gpus: [h100-sxm, l40s, a100-80gb]
  tensor_parallel: [1, 2]
  replicas: {min: 1, max: 8}
"""


def brute_force(path: Path) -> dict[int, tuple[float, float, int]]:
    """Per candidate index: (cost per day, -headroom, fewest replicas meeting the SLO), over every point."""
    plan = load_plan(path)
    slo = {m: b.model_dump() for m, b in plan.spec.slo.items()}
    out = {}
    for c in plan.candidates:
        counts = range(c.replicas[0], c.replicas[1] + 1) if c.replicas_path else [None]
        for r in counts:
            try:
                workload = plan.workload(c, r, plan.spec.target)
            except ConfigError:
                break  # the model does not fit this GPU group: nothing to run
            summary = run(workload, keep_requests=False, force=True).summary
            if slo_verdict(summary, plan.spec.slo)[0] and served_share(summary) >= plan.spec.min_served_share:
                room = headroom({"at_peak": summary}, slo)[0]
                out[c.index] = (summary["cost_per_hour_usd"] * 24.0, -room, r)
                break
    return out


@pytest.fixture(scope="module")
def small_space(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plan")
    path = write_plan(folder, SMALL_SPACE)
    result = make_plan(path, out=folder / "out", workers=1, progress=False)
    return path, result


def test_plan_answer_equals_brute_force_while_simulating_a_third_of_the_points(small_space):
    path, result = small_space
    doc = result.document
    truth = brute_force(path)
    best = min(truth, key=lambda i: (*truth[i][:2], i))
    assert doc["best"] == best
    record = next(r for r in doc["candidates"] if r["index"] == best)
    assert record.get("peak_replicas") == truth[best][2]
    assert record["cost_per_day_usd"] == pytest.approx(truth[best][0], rel=1e-12)
    # The ranked ones (keep 3) are brute force's three cheapest, in its order, at its replica counts.
    ranked = [r for r in (next(x for x in doc["candidates"] if x["index"] == i) for i in doc["ranking"])
              if r["status"] == "ok"][:3]
    expected = sorted(truth, key=lambda i: (*truth[i][:2], i))[:3]
    assert [r["index"] for r in ranked] == expected
    assert [r.get("peak_replicas") for r in ranked] == [truth[i][2] for i in expected]
    assert doc["space_points"] == 3 * 2 * 8 + 2
    assert doc["simulated_points"] <= doc["space_points"] / 3, doc["simulated_points"]


def test_plan_outputs_and_report(small_space, capsys):
    path, result = small_space
    out = result.out
    ranking = pd.read_parquet(out / "plan.parquet")
    probes = pd.read_parquet(out / "probes.parquet")
    assert len(ranking) == 8 and ranking["rank"].iloc[0] == 1
    assert len(probes) == result.document["simulated_points"]
    # The frontier: probes at the target no other beats on both cost and the binding latency, fastest first.
    front, metric = result.document["frontier"], result.document["frontier_metric"]
    at_target = probes[probes["load"] == 3.0]
    assert front and [f[metric] for f in front] == sorted(f[metric] for f in front)
    for f in front:
        beaten = (at_target["cost_per_hour_usd"] <= f["cost_per_hour_usd"]) & (
            at_target[f"{metric}_ci95_high"] <= f[metric]) & ((at_target["cost_per_hour_usd"] < f["cost_per_hour_usd"])
                                                              | (at_target[f"{metric}_ci95_high"] < f[metric]))
        assert not beaten.any(), f
    assert {"replicas", "load", "met", "ttft_p95_s_ci95_high", "cost_per_hour_usd"} <= set(probes.columns)
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    first = page.index('<p class="answer">')
    assert page.index("The cheapest deployment meeting the SLO") > first
    assert page.index("The cheapest deployment meeting the SLO") < page.index("<h2>")  # at the top
    assert (out / "figures" / "plan_frontier.png").is_file()
    assert "Cost over the forecast day" in (out / "report.md").read_text()  # named as skipped, with why


def test_fewer_workers_or_more_give_the_same_answer(small_space, tmp_path):
    path, result = small_space
    again = make_plan(path, out=tmp_path / "two", workers=2, progress=False)
    assert again.document["best"] == result.document["best"]
    assert again.answer == result.answer
    # plan.json lists the candidates in the plan's order, whichever worker finished first
    assert [r["index"] for r in again.document["candidates"]] == sorted(r["index"] for r in
                                                                        again.document["candidates"])


def test_a_dask_cluster_gives_the_local_answer(small_space, tmp_path):
    pytest.importorskip("dask.distributed")
    path, result = small_space
    remote = make_plan(path, out=tmp_path / "dask", executor="dask", workers=2, progress=False)
    assert remote.answer == result.answer


def test_a_forecast_counts_each_load_once():
    from sim.experiments.plan.spec import Plan

    plan = Plan(kind="plan", workload="w.yaml", slo={"ttft_p95_s": 1.0}, apis={"a": {}},
                forecast=[{"load": 1.0, "hours": 8}, {"load": 2.0, "hours": 8}, {"load": 1.0, "hours": 8}])
    assert [(p.load, p.hours) for p in plan.periods()] == [(2.0, 8.0), (1.0, 16.0)]


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 20), st.integers(0, 25), st.data())
def test_fewest_meeting_finds_the_first_count_of_a_monotone_verdict(low, span, data):
    high = low + span
    first = data.draw(st.integers(low, high + 1))  # high + 1: none meets
    asked = []

    def meets(r: int) -> bool:
        asked.append(r)
        return r >= first

    found = fewest_meeting(low, high, meets)
    assert found == (first if first <= high else None)
    assert len(asked) <= 2 * math.ceil(math.log2(span + 2)) + 1
    assert all(low <= r <= high for r in asked)


HYPOTHESIS_PLAN = """\
target: {load}
slo: {{ttft_p95_s: {ttft}, e2e_p99_s: {e2e}}}
self_hosted:
  model: {model}
  gpus: {gpus}
  tensor_parallel: {tps}
  replicas: {{min: 1, max: {most}}}
"""


@settings(max_examples=6, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(load=st.sampled_from([0.5, 1.5, 3.0, 5.0]), ttft=st.sampled_from([0.3, 1.0, 3.0]),
       e2e=st.sampled_from([8.0, 15.0, 40.0]), model=st.sampled_from(["llama-3.1-8b", "qwen2.5-32b"]),
       gpus=st.lists(st.sampled_from(["h100-sxm", "l40s", "a10g", "a100-40gb"]), min_size=1, max_size=2,
                     unique=True),
       tps=st.lists(st.sampled_from([1, 2]), min_size=1, max_size=2, unique=True), most=st.integers(2, 4))
def test_pruning_never_drops_the_brute_force_optimum(tmp_path, load, ttft, e2e, model, gpus, tps, most):
    body = HYPOTHESIS_PLAN.format(load=load, ttft=ttft, e2e=e2e, model=model, gpus=json.dumps(gpus),
                                  tps=json.dumps(tps), most=most)
    path = write_plan(tmp_path, body, apis=False)
    plan = load_plan(path)
    truth = brute_force(path)
    if not truth:
        return  # nothing meets the SLO: nothing for pruning to lose
    best = min(truth, key=lambda i: (*truth[i][:2], i))
    b = bounds(plan, plan.candidates[best])
    assert b.pruned is None, (plan.candidates[best].name, b.pruned)
    assert b.fewest[load] <= truth[best][2]


def test_a_forecast_sizes_fixed_and_scheduled_fleets(tmp_path):
    body = """\
forecast: [{load: 1.0, hours: 16}, {load: 4.0, hours: 8}]
slo: {ttft_p95_s: 1.0, e2e_p99_s: 15.0}
self_hosted:
  model: llama-3.1-8b
  gpus: [h100-sxm]
  replicas: {min: 1, max: 8}
  scaling: [fixed, scheduled]
"""
    doc = make_plan(write_plan(tmp_path, body, apis=False), out=tmp_path / "out", workers=1,
                    progress=False).document
    fixed, scheduled = sorted(doc["candidates"], key=lambda r: r["index"])
    assert fixed["scaling"] == "fixed" and scheduled["scaling"] == "scheduled"
    assert set(fixed["replicas"].values()) == {fixed["peak_replicas"]}
    busy, quiet = scheduled["replicas"]["4.0"], scheduled["replicas"]["1.0"]
    assert quiet < busy == fixed["peak_replicas"]
    assert scheduled["cost_per_day_usd"] < fixed["cost_per_day_usd"]
    assert scheduled["cost_per_day_usd"] == pytest.approx(8 * busy * 2.99 + 16 * quiet * 2.99, rel=1e-9)
    assert doc["best"] == scheduled["index"]
    assert "over the forecast day" in doc["answer"]


def test_a_model_that_does_not_fit_is_pruned_with_the_catalog_reason(tmp_path):
    body = """\
target: 1.0
slo: {ttft_p95_s: 2.0}
self_hosted: {model: llama-3.1-70b, gpus: [l40s], tensor_parallel: [1, 2], replicas: {min: 1, max: 2}}
"""
    plan = load_plan(write_plan(tmp_path, body, apis=False))
    reasons = [bounds(plan, c).pruned for c in plan.candidates]
    assert all(r and "does not fit on" in r for r in reasons), reasons


def test_resume_keeps_finished_candidates(small_space, tmp_path):
    path, result = small_space
    out = tmp_path / "resumed"
    first = make_plan(path, out=out, workers=1, progress=False)
    with pytest.raises(ConfigError, match="add --resume"):
        make_plan(path, out=out, workers=1, progress=False)
    doc = json.loads((out / "plan.json").read_text())
    searched = [r for r in doc["candidates"] if r["status"] != "pruned"]
    doc["candidates"] = [r for r in doc["candidates"] if r is not searched[-1]]  # as if it died before the last
    (out / "plan.json").write_text(json.dumps(doc))
    again = make_plan(path, out=out, workers=1, resume=True, progress=False)
    assert again.answer == first.answer
    assert again.document["simulated_points"] == first.document["simulated_points"]


@pytest.mark.parametrize("body, message", [
    ("target: 1\nforecast: [{load: 1, hours: 24}]\nslo: {ttft_p95_s: 1}\nself_hosted: {gpus: [h100-sxm], "
     "replicas: {max: 2}}\n", "give target (one load) or forecast"),
    ("forecast: [{load: 1, hours: 20}]\nslo: {ttft_p95_s: 1}\nself_hosted: {gpus: [h100-sxm], replicas: {max: 2}}\n",
     "the hours sum to 20, not 24"),
    ("target: 1\nslo: {ttft_p95_s: 1}\nself_hosted:\n  gpus: [h100-sxm, h100x]\n  replicas: {max: 2}\n",
     "plan.yaml:7: self_hosted.gpus.1: unknown GPU 'h100x'"),
    ("target: 1\nslo: {ttft_p95_s: 1}\nendpoint: gpt\nself_hosted: {gpus: [h100-sxm], replicas: {max: 2}}\n",
     "plan.yaml:6: endpoint: no model endpoint 'gpt'"),
    ("target: 1\nslo: {ttfx_p95_s: 1}\nself_hosted: {gpus: [h100-sxm], replicas: {max: 2}}\n",
     "slo.ttfx_p95_s: unknown metric"),
    ("target: 1\nslo: {ttft_p95_s: 1}\nself_hosted: {gpus: [h100-sxm], replicas: {min: 3, max: 2}}\n",
     "min (3) is above max (2)"),
    ("target: 1\nslo: {ttft_p95_s: 1}\nself_hosted: {gpus: [h100-sxm], replicas: {max: 2}, scaling: [scheduled]}\n",
     "scheduled scaling sets replicas per forecast period"),
    ("target: 1\nslo: {ttft_p95_s: 1}\nself_hosted: {gpus: [h100-sxm], replicas: {max: 2}, "
     "gpu_hourly_usd: {h200: 3}}\n", "gpu_hourly_usd.h200: not one of the gpus listed (h100-sxm)"),
    ("target: 1\nslo: {ttft_p95_s: 1}\nmixes: {m: {gpu: h100-sxm, api: x, to_self_hosted: {chat: 0.5}}}\n",
     "a mix takes its model, replicas and prices from self_hosted"),
])
def test_bad_plans_are_one_line_errors_with_exit_2(tmp_path, capsys, body, message):
    path = write_plan(tmp_path, body, apis=False)
    code = main(["plan", str(path), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert message in err[0], err[0]
    assert not (tmp_path / "out").exists()


def test_a_bad_api_block_is_blamed_on_its_line(tmp_path, capsys):
    body = "target: 1\nslo: {ttft_p95_s: 1}\napis:\n  cheap: {kind: api, concurrency: -1, ttft_s: 1}\n"
    path = write_plan(tmp_path, body, apis=False)
    assert main(["plan", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "plan.yaml:7: apis.cheap:" in err and "concurrency" in err, err


def test_a_gpu_too_slow_for_a_latency_bound_alone_is_pruned(tmp_path):
    body = "target: 1.0\nslo: {e2e_p99_s: 6.0}\nself_hosted: {model: llama-3.1-8b, gpus: [l40s, h100-sxm], " \
           "replicas: {min: 1, max: 4}}\n"
    plan = load_plan(write_plan(tmp_path, body, apis=False))
    slow, fast = (bounds(plan, c).pruned for c in plan.candidates)
    # An L40S reads the 16 GB of weights at 864 GB/s: ~22 ms a token, 17 s for a p99 answer of ~800 tokens.
    assert slow is not None and "e2e_p99_s is already about 17" in slow, slow
    assert fast is None  # an H100's floor, ~5 s, passes: only simulation can tell


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("plan-*.yaml")), ids=lambda p: p.name)
def test_every_shipped_plan_checks_and_prunes_without_running(path, tmp_path):
    text = dry_run(path)
    assert text.startswith(f"{path}: ") and "nothing run" in text
    assert main(["plan", str(path), "--dry-run", "--out", str(tmp_path / "out")]) == 0
    assert not (tmp_path / "out").exists()


def test_plans_and_sweeps_name_each_other(capsys):
    assert main(["sweep", str(ROOT / "experiments" / "plan-chat.yaml")]) == 2
    assert "run it with `llmsim plan" in capsys.readouterr().err
    assert main(["plan", str(ROOT / "experiments" / "capacity-review.yaml")]) == 2
    assert "run it with `llmsim sweep" in capsys.readouterr().err


def test_every_plan_field_has_help():
    from sim.reference import fields_without_help, plan_schema

    assert fields_without_help(plan_schema()) == []


def test_a_mix_splits_a_class_between_replicas_and_an_api(tmp_path):
    body = """\
target: 3.0
slo: {ttft_p95_s: 1.5, e2e_p99_s: 15.0}
self_hosted: {model: llama-3.1-8b, gpus: [h100-sxm], replicas: {min: 1, max: 4}}
mixes:
  quarter: {gpu: h100-sxm, api: small, to_self_hosted: {chat: 0.75}}
"""
    path = write_plan(tmp_path, body)
    plan = load_plan(path)
    mix = next(c for c in plan.candidates if c.kind == "mix")
    workload = plan.workload(mix, 1, 3.0)
    assert workload.traffic.classes["chat"].endpoint_mix() == {"llama8b": 0.75, "small": 0.25}
    assert set(workload.models) == {"llama8b", "small"}
    doc = make_plan(path, out=tmp_path / "out", workers=1, progress=False).document
    record = next(r for r in doc["candidates"] if r["kind"] == "mix")
    assert record["status"] == "ok"
    # Its fewest replicas, as a run of every count finds them; its bill: the GPUs and the API's quarter of the tokens.
    r = record["peak_replicas"]
    counts = range(1, 5)
    summaries = [run(plan.workload(mix, n, 3.0), keep_requests=False).summary for n in counts]
    met = [slo_verdict(x, plan.spec.slo)[0] and served_share(x) >= 0.99 for x in summaries]
    assert r == counts[met.index(True)]
    hourly = record["at_peak"]["cost_per_hour_usd"]
    assert hourly > r * 2.99
    alone = next(x for x in doc["candidates"] if x["name"] == "API small")["at_peak"]["cost_per_hour_usd"]
    assert hourly - r * 2.99 == pytest.approx(0.25 * alone, rel=0.1)
    assert deployment(record) == f"quarter: {r} x h100-sxm (TP 1) + API small"


def test_a_mix_can_burst_to_the_api_when_the_replicas_queue(tmp_path):
    body = """\
target: 3.0
slo: {ttft_p95_s: 1.5, e2e_p99_s: 15.0}
self_hosted: {model: llama-3.1-8b, gpus: [h100-sxm], replicas: {min: 1, max: 3}}
mixes:
  burst: {gpu: h100-sxm, api: small, overflow_above: 0}
"""
    plan = load_plan(write_plan(tmp_path, body))
    mix = next(c for c in plan.candidates if c.kind == "mix")
    workload = plan.workload(mix, 1, 3.0)
    assert workload.models["llama8b"].queue.overflow.to == "small"
    assert workload.traffic.classes["chat"].endpoint_mix() == {"llama8b": 1.0}
    b = bounds(plan, mix)
    assert b.pruned is None and b.fewest == {3.0: 1}  # its load on the replicas is not known before it runs
    one = run(workload, keep_requests=False).summary
    assert one["utilisation_small"] > 0 and one["utilisation_llama8b"] > 0.9  # the replica full, the rest bursts


def test_your_gpu_price_replaces_the_catalogs(tmp_path):
    body = "target: 1.0\nslo: {ttft_p95_s: 2.0}\nself_hosted: {model: llama-3.1-8b, gpus: [h100-sxm, l40s], " \
           "tensor_parallel: [2], replicas: {max: 2}, gpu_hourly_usd: {H100 SXM: 2.10}}\n"
    plan = load_plan(write_plan(tmp_path, body, apis=False))
    h100, l40s = (plan.workload(c, 3, 1.0).models["llama8b"] for c in plan.candidates)
    assert h100.gpu_hourly_usd == 2.10 and h100.replica_hourly_usd == pytest.approx(4.20)
    assert l40s.gpu_hourly_usd == 1.95  # the catalog's (sim/catalog/gpus.yaml)
    assert bounds(plan, plan.candidates[0]).gpu_usd_h(3) == pytest.approx(3 * 4.20)


def test_the_how_to_plan_example_loads(tmp_path):
    import re

    text = (ROOT / "docs" / "how-to" / "plan.md").read_text()
    example = next(b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "kind: plan" in b)
    path = tmp_path / "plan.yaml"
    path.write_text(example.replace("../workloads/", f"{ROOT / 'workloads'}/"))
    plan = load_plan(path)
    assert [c.kind for c in plan.candidates] == ["self_hosted"] * 8 + ["api"]


def test_an_autoscaled_fleet_is_simulated_and_must_serve_the_load(tmp_path):
    body = """\
target: 3.0
slo: {ttft_p95_s: 1.5, e2e_p99_s: 15.0}
self_hosted:
  model: llama-3.1-8b
  gpus: [h100-sxm]
  replicas: {min: 1, max: 6}
  scaling: [fixed, autoscaled]
  autoscale: {metric: utilisation, target: 0.5}
"""
    path = write_plan(tmp_path, body, apis=False)
    plan = load_plan(path)
    fixed, scaled = plan.candidates
    workload = plan.workload(scaled, None, 3.0)
    policy = workload.models["llama8b"].autoscale
    assert (policy.min_replicas, policy.max_replicas, policy.target) == (1, 6, 0.5)
    doc = make_plan(path, out=tmp_path / "out", workers=1, progress=False).document
    auto = next(r for r in doc["candidates"] if r["index"] == scaled.index)
    assert auto["status"] == "ok" and len(auto["probes"]) == 1 and auto["peak_replicas"] is None
    # At a target utilisation of 0.5 the autoscaler holds more than the 2 replicas the fixed fleet needs.
    assert auto["cost_per_hour_usd"] > 2 * 2.99
    assert served_share(auto["at_peak"]) >= 0.99


def test_a_deployment_that_drops_requests_fails_however_fast_its_answers(tmp_path):
    from sim.experiments.plan.search import plan_verdict

    plan = load_plan(write_plan(tmp_path, SMALL_SPACE))
    fast = {"ttft_p95_s": 0.2, "ttft_p95_s_ci95_high": 0.3, "e2e_p99_s": 5.0, "e2e_p99_s_ci95_high": 6.0,
            "requests_arrived": 1000.0}
    assert plan_verdict({**fast, "requests_completed": 995.0}, plan.spec) == (True, None)
    assert plan_verdict({**fast, "requests_completed": 600.0}, plan.spec) == (False, "served_share")


@pytest.mark.parametrize("policy, message", [
    ("{target: 0.5, max_replicas: 9}", "self_hosted.autoscale: max_replicas comes from self_hosted.replicas"),
    ("{metric: cpu, target: 0.5}", "self_hosted.autoscale.metric: Input should be"),
])
def test_a_bad_autoscale_policy_is_a_line_error(tmp_path, capsys, policy, message):
    body = ("target: 1\nslo: {ttft_p95_s: 1}\nself_hosted:\n  gpus: [h100-sxm]\n  replicas: {max: 2}\n"
            f"  scaling: [autoscaled]\n  autoscale: {policy}\n")
    path = write_plan(tmp_path, body, apis=False)
    assert main(["plan", str(path), "--quiet"]) == 2
    assert message in capsys.readouterr().err
