"""Checks before and after a run that warn (one line each, on standard error and in the JSON summary): a per-user
limit on a class of one user, offered traffic near a provider's limits, an output cache still warming."""
from __future__ import annotations

import json
from pathlib import Path

from sim.cli import main
from sim.config.loader import load_workload
from sim.experiments.run import workload_warnings
from sim.model.offered import provider_limit_warnings

ROOT = Path(__file__).resolve().parent.parent
MMC, CHAT_API, RAG = (ROOT / "workloads" / name for name in ("mmc.yaml", "chat-api.yaml", "rag-support.yaml"))
BUCKET = "rate_limits=[{kind: token_bucket, scope: user, rate_rps: 1, burst: 5}]"


def test_a_per_user_limit_on_a_class_of_one_user_warns(capsys):
    lines = workload_warnings(load_workload(MMC, [BUCKET]))
    assert lines == ["rate_limits[0]: a per-user limit on jobs, whose requests all come from one user (no users "
                     "block): it throttles the whole class as one user; give traffic.classes.jobs.users.count"]
    assert main(["validate", str(MMC), "--set", BUCKET]) == 0
    assert f"llmsim: warning: {lines[0]}" in capsys.readouterr().err
    # One user said out loud (a bot, say), or many users: no warning.
    for users in ("{count: 1}", "{count: 50}"):
        assert workload_warnings(load_workload(MMC, [BUCKET, f"traffic.classes.jobs.users={users}"])) == []
    global_bucket = BUCKET.replace("scope: user", "scope: global")
    assert workload_warnings(load_workload(MMC, [global_bucket])) == []


def test_offered_traffic_near_a_providers_limit_names_the_binding_one():
    # chat-api: 5.5 req/s of ~1,456 prompt + ~172 output tokens (lognormal means): 330 requests and ~540k tokens
    # a minute.
    assert provider_limit_warnings(load_workload(CHAT_API)) == []
    tpm = provider_limit_warnings(load_workload(CHAT_API, ["models.gpt4o-mini.limits={rpm: 10000, tpm: 400000}"]))
    assert len(tpm) == 1 and "exceeds the provider's tpm 400,000 (1" in tpm[0] and "330 requests" in tpm[0]
    rpm = provider_limit_warnings(load_workload(CHAT_API, ["models.gpt4o-mini.limits={rpm: 360, tpm: 9000000}"]))
    assert len(rpm) == 1 and "comes near the provider's rpm 360 (92% of it)" in rpm[0]
    assert provider_limit_warnings(load_workload(CHAT_API, ["models.gpt4o-mini.limits={rpm: 500}"])) == []


def test_an_output_cache_still_warming_at_the_end_warns_in_the_json_summary(capsys):
    # rag-support's output cache (20,000 entries, 2.4 cacheable questions a second) fills in hours: over the
    # shipped half hour its hit rate still climbs, from 30% to 38% between the window's halves.
    assert main(["run", str(RAG), "--replications", "1", "--json"]) == 0
    out = capsys.readouterr()
    warnings = json.loads(out.out)["warnings"]
    warming = [w for w in warnings if w.startswith("pipeline.output_cache: still warming at the end of the run")]
    assert len(warming) == 1 and f"llmsim: warning: {warming[0]}" in out.err
    # Started as after a day of traffic, it is in its steady state (a hit rate near 56%): no warning.
    assert main(["run", str(RAG), "--replications", "1", "--json", "--quiet",
                 "--set", "pipeline.output_cache.warm_up_s=86400"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert not any("still warming" in w for w in summary["warnings"]) and summary["cache_hit_rate_output"] > 0.5
