"""YAML loading, file:line errors and --set overrides (sim.config.loader / overrides).

Fixtures are written inline so the line numbers asserted below can be read off
the text: the first line of each dedented block is line 1.
"""
from __future__ import annotations

import pickle
import textwrap
from pathlib import Path

import pytest

from sim.config.loader import ConfigError, load_workload, load_yaml_with_lines, validate_model
from sim.config.overrides import apply_overrides
from sim.config.schema import Workload

VALID = """\
name: demo
simulation:
  duration_s: 600
  replications: 2
traffic:
  classes:
    chat:
      arrival: {kind: poisson, rate_rps: 1e-3}
      prompt_tokens: {kind: lognormal, mean: 800, p95: 2000}
      output_tokens: {kind: exponential, mean: 200}
      endpoint: llama8b
models:
  llama8b:
    kind: self_hosted
    replicas: 2
    service_time: 1.5
"""


def write(tmp_path: Path, text: str, name: str = "w.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def errors(path: Path, overrides: tuple[str, ...] = ()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_workload(path, overrides)
    return info.value.lines


# ------------------------------------------------------------------ loading


def test_valid_workload_loads(tmp_path):
    wl = load_workload(write(tmp_path, VALID))
    assert isinstance(wl, Workload)
    assert wl.name == "demo"
    assert wl.simulation.replications == 2
    chat = wl.traffic.classes["chat"]
    assert chat.endpoint == "llama8b"
    assert chat.output_tokens.mean == 200
    assert wl.models["llama8b"].replicas == 2
    assert wl.models["llama8b"].service_time.value == 1.5  # a plain number is a constant


def test_exponent_without_dot_is_a_float(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-3 as a string; it must still be the number 0.001,
    # also where a distribution is expected (a number there means a constant).
    path = write(tmp_path, VALID.replace("prompt_tokens: {kind: lognormal, mean: 800, p95: 2000}", "prompt_tokens: 8e2"))
    wl = load_workload(path)
    chat = wl.traffic.classes["chat"]
    assert chat.arrival.rate_rps == pytest.approx(0.001)
    assert isinstance(chat.arrival.rate_rps, float)
    assert chat.prompt_tokens.kind == "constant" and chat.prompt_tokens.value == 800.0


def test_quoted_numeric_string_still_validates_as_float(tmp_path):
    wl = load_workload(write(tmp_path, VALID.replace("rate_rps: 1e-3", "rate_rps: '1e-3'")))
    assert wl.traffic.classes["chat"].arrival.rate_rps == pytest.approx(0.001)


def test_lines_of_keys_and_list_items(tmp_path):
    path = write(
        tmp_path,
        """\
        # comment
        a:
          b: 1
          c:
            - x
            - {d: 2}
        """,
    )
    data, lines = load_yaml_with_lines(path)
    assert data == {"a": {"b": 1, "c": ["x", {"d": 2}]}}
    assert lines[()] == 2
    assert lines[("a",)] == 2
    assert lines[("a", "b")] == 3
    assert lines[("a", "c", 0)] == 5
    assert lines[("a", "c", 1)] == 6
    assert lines[("a", "c", 1, "d")] == 6


def test_merge_key_is_not_a_duplicate_and_own_keys_win(tmp_path):
    path = write(
        tmp_path,
        """\
        base: &b {x: 1, y: 2}
        other:
          <<: *b
          y: 3
        """,
    )
    data, lines = load_yaml_with_lines(path)
    assert data["other"] == {"x": 1, "y": 3}
    assert lines[("other", "y")] == 4
    assert lines[("other", "x")] == 1  # defined in the anchor


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_workload(path)
    assert info.value.lines == [f"{path}: file not found"]


def test_yaml_syntax_error(tmp_path):
    path = write(
        tmp_path,
        """\
        name: demo
        models:
          m: {kind: api, concurrency: 2
        traffic: {}
        """,
    )
    assert errors(path) == [f"{path}:4: YAML syntax error: expected ',' or '}}', but got ':'"]


def test_top_level_must_be_a_mapping(tmp_path):
    path = write(tmp_path, "- a\n- b\n")
    assert errors(path) == [f"{path}:1: the top level must be a mapping of keys to values, got a list"]


def test_duplicate_keys(tmp_path):
    path = write(
        tmp_path,
        """\
        models:
          m:
            kind: api
            concurrency: 2
            concurrency: 3
        models: {}
        """,
    )
    assert errors(path) == [
        f"{path}:5: models.m.concurrency: duplicate key (first given on line 4)",
        f"{path}:6: models: duplicate key (first given on line 1)",
    ]


def test_str_joins_lines_and_error_pickles():
    err = ConfigError(["a.yaml:1: x: bad", "a.yaml:2: y: worse"])
    assert str(err) == "a.yaml:1: x: bad\na.yaml:2: y: worse"
    assert pickle.loads(pickle.dumps(err)).lines == err.lines


# --------------------------------------------------------------- validation


def test_unknown_key_did_you_mean(tmp_path):
    path = write(tmp_path, VALID.replace("    replicas: 2", "    replicaz: 2"))
    assert errors(path) == [f"{path}:15: models.llama8b.replicaz: unknown key 'replicaz' (did you mean 'replicas'?)"]


def test_unknown_key_lists_known_keys_with_aliases(tmp_path):
    path = write(tmp_path, VALID.replace("{kind: exponential, mean: 200}", "{kind: exponential, average: 200}"))
    assert errors(path) == [
        f"{path}:10: traffic.classes.chat.output_tokens.mean: required key is missing",
        f"{path}:10: traffic.classes.chat.output_tokens.average: unknown key 'average' (known: kind, mean)",
    ]


def test_wrong_type(tmp_path):
    path = write(tmp_path, VALID.replace("replicas: 2", 'replicas: "four"'))
    assert errors(path) == [f"{path}:15: models.llama8b.replicas: must be an integer, got 'four'"]


def test_negative_rate(tmp_path):
    path = write(tmp_path, VALID.replace("rate_rps: 1e-3", "rate_rps: -2"))
    assert errors(path) == [f"{path}:8: traffic.classes.chat.arrival.rate_rps: must be greater than 0"]


def test_zero_replications(tmp_path):
    path = write(tmp_path, VALID.replace("replications: 2", "replications: 0"))
    assert errors(path) == [f"{path}:4: simulation.replications: must be greater than or equal to 1"]


def test_lognormal_p95_below_mean(tmp_path):
    path = write(tmp_path, VALID.replace("p95: 2000", "p95: 500"))
    assert errors(path) == [f"{path}:9: traffic.classes.chat.prompt_tokens: p95 (500.0) must be above the mean (800.0)"]


def test_empirical_csv_is_read_relative_to_the_workload(tmp_path):
    (tmp_path / "traces.csv").write_text("out\n10\n30\n")
    path = write(tmp_path, VALID.replace("{kind: exponential, mean: 200}", "{kind: empirical, csv: traces.csv, column: out}"))
    assert load_workload(path).traffic.classes["chat"].output_tokens.mean == 20.0


def test_empirical_csv_missing(tmp_path):
    path = write(tmp_path, VALID.replace("{kind: exponential, mean: 200}", "{kind: empirical, csv: gone.csv, column: out}"))
    assert errors(path) == [f"{path}:10: traffic.classes.chat.output_tokens: CSV file not found: {tmp_path / 'gone.csv'}"]


def test_unknown_kind(tmp_path):
    path = write(tmp_path, VALID.replace("kind: poisson", "kind: posson"))
    assert errors(path) == [
        f"{path}:8: traffic.classes.chat.arrival.kind: unknown kind 'posson' (did you mean 'poisson'?; known: poisson, closed, schedule, diurnal, mmpp, gamma, sessions, trace)"
    ]


def test_missing_kind(tmp_path):
    path = write(tmp_path, VALID.replace("    kind: self_hosted\n", ""))
    assert errors(path) == [f"{path}:13: models.llama8b: missing 'kind' (one of: self_hosted, api)"]


def test_missing_required_key_uses_parent_line(tmp_path):
    path = write(tmp_path, VALID.replace("      prompt_tokens: {kind: lognormal, mean: 800, p95: 2000}\n", ""))
    assert errors(path) == [f"{path}:7: traffic.classes.chat.prompt_tokens: required key is missing "
                            "(only a trace replay may leave it out)"]


def test_plain_union_gives_one_line(tmp_path):
    # warmup_s is a number or 'auto': pydantic reports each alternative; the user sees one line.
    path = write(tmp_path, VALID.replace("  replications: 2", "  replications: 2\n  warmup_s: soon"))
    assert errors(path) == [f"{path}:5: simulation.warmup_s: must be a number or 'auto', got 'soon'"]


def test_unknown_endpoint_from_root_validator(tmp_path):
    path = write(tmp_path, VALID.replace("endpoint: llama8b", "endpoint: llama70b"))
    assert errors(path) == [f"{path}:11: traffic.classes.chat.endpoint: unknown model 'llama70b' (known: llama8b)"]


def test_several_errors_in_file_order(tmp_path):
    path = write(
        tmp_path,
        """\
        simulation: {replications: 0}
        traffic:
          classes:
            chat:
              arrival: {kind: poisson, rate_rps: 0}
              prompt_tokens: -1
              output_tokens: 5
        models:
          m: {kind: api, concurrency: 0, service_time: 1, bogus: 1}
        """,
    )
    assert errors(path) == [
        f"{path}:1: simulation.replications: must be greater than or equal to 1",
        f"{path}:5: traffic.classes.chat.arrival.rate_rps: must be greater than 0",
        f"{path}:6: traffic.classes.chat.prompt_tokens: must be greater than or equal to 0",
        f"{path}:9: models.m.concurrency: must be greater than 0",
        f"{path}:9: models.m.bogus: unknown key 'bogus' (known: kind, concurrency, ttft_s, output_tokens_per_s, "
        "service_time, price_per_mtok_in, price_per_mtok_out, queue, limits, prompt_cache, connections, batch, "
        "scale_to_zero)",
    ]


def test_validate_model_is_generic(tmp_path):
    # The experiments loader will reuse it with its own model and its own file.
    data, lines = load_yaml_with_lines(write(tmp_path, "slo:\n  ttft_s: -1\n", "e.yaml"))
    with pytest.raises(ConfigError) as info:
        validate_model(Workload, data, lines, "e.yaml", tmp_path)
    assert info.value.lines == [
        "e.yaml:1: traffic: required key is missing",
        "e.yaml:1: models: required key is missing",
        "e.yaml:2: slo.ttft_s: must be greater than 0",
    ]


# --------------------------------------------------------------- overrides


def test_overrides_apply(tmp_path):
    wl = load_workload(
        write(tmp_path, VALID),
        [
            "models.llama8b.replicas=8",
            "simulation.warmup_s=auto",
            "traffic.classes.chat.arrival={kind: closed, users: 5, think_time_s: 2}",
            "traffic.classes.chat.output_tokens.mean=50",  # alias of mean_value
            "slo.ttft_s=1",  # slo is absent from the file: created
        ],
    )
    assert wl.models["llama8b"].replicas == 8
    assert wl.simulation.warmup_s == "auto"
    assert wl.traffic.classes["chat"].arrival.kind == "closed"
    assert wl.traffic.classes["chat"].arrival.users == 5
    assert wl.traffic.classes["chat"].output_tokens.mean == 50
    assert wl.slo.ttft_s == 1.0


def test_override_numeric_string(tmp_path):
    wl = load_workload(write(tmp_path, VALID), ["traffic.classes.chat.arrival.rate_rps=2.5e-2"])
    assert wl.traffic.classes["chat"].arrival.rate_rps == pytest.approx(0.025)


def test_apply_overrides_leaves_input_alone():
    data = {"simulation": {"seed": 1}}
    out = apply_overrides(data, ["simulation.seed=7"], Workload)
    assert out == {"simulation": {"seed": 7}}
    assert data == {"simulation": {"seed": 1}}


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("models.foo.replicas=3", "--set models.foo.replicas: no model 'foo' (known: llama8b)"),
        ("models.lama8b.replicas=3", "--set models.lama8b.replicas: no model 'lama8b' (did you mean 'llama8b'?)"),
        ("traffic.classes.caht.endpoint=x", "--set traffic.classes.caht.endpoint: no class 'caht' (did you mean 'chat'?)"),
        ("simulation.durration_s=5", "--set simulation.durration_s: unknown key 'durration_s' (did you mean 'duration_s'?)"),
        ("foo", "--set foo: expected PATH=VALUE"),
        ("=3", "--set =3: expected PATH=VALUE"),
        ("models.llama8b.replicas=[1", "--set models.llama8b.replicas: cannot parse value '[1': "
         "expected ',' or ']', but got '<stream end>'"),
        ("models.llama8b.ttft_s.mean=1", "--set models.llama8b.ttft_s.mean: unknown key 'ttft_s' "
         "(known: kind, replicas, max_batch, gpu_hourly_usd, engine, service_time, queue, prompt_cache, cold_start_s, autoscale, "
         "scale_to_zero, connections, dispatch)"),
        ("models.llama8b.service_time.mean=1", "--set models.llama8b.service_time.mean: "
         "models.llama8b.service_time is 1.5 in the workload, not a mapping; "
         "set it whole, e.g. --set models.llama8b.service_time='{kind: ..., ...}' "
         "(kind: one of constant, exponential, uniform, normal, lognormal, gamma, empirical)"),
        ("simulation.seed.x=1", "--set simulation.seed.x: simulation.seed is a single value and has no keys"),
    ],
)
def test_bad_override_paths(tmp_path, override, line):
    assert errors(write(tmp_path, VALID), (override,)) == [line]


def test_every_bad_override_is_reported(tmp_path):
    assert errors(write(tmp_path, VALID), ("a=1", "b")) == [
        "--set a: unknown key 'a' (known: version, name, description, simulation, traffic, models, slo, rate_limits, pipeline)",
        "--set b: expected PATH=VALUE",
    ]


def test_bad_value_from_override(tmp_path):
    assert errors(write(tmp_path, VALID), ("models.llama8b.replicas=-1",)) == [
        "--set models.llama8b.replicas: must be greater than 0"
    ]


def test_bad_value_inside_an_overridden_block(tmp_path):
    path = write(tmp_path, VALID)
    assert errors(path, ("traffic.classes.chat.arrival={kind: poisson, rate_rps: -2}",)) == [
        "--set traffic.classes.chat.arrival.rate_rps: must be greater than 0"
    ]


def test_override_to_unknown_endpoint(tmp_path):
    assert errors(write(tmp_path, VALID), ("traffic.classes.chat.endpoint=gpt",)) == [
        "--set traffic.classes.chat.endpoint: unknown model 'gpt' (known: llama8b)"
    ]


def test_error_in_block_created_by_override(tmp_path):
    # engine is absent from the file; --set creates it, so its missing step_time is --set's doing.
    assert errors(write(tmp_path, VALID), ("models.llama8b.engine.max_batch_tokens=512",)) == [
        "--set models.llama8b.engine.step_time: required key is missing"
    ]


def test_file_errors_and_override_errors_together(tmp_path):
    path = write(tmp_path, VALID.replace("replications: 2", "replications: 0"))
    assert errors(path, ("models.llama8b.replicas=0",)) == [
        f"{path}:4: simulation.replications: must be greater than or equal to 1",
        "--set models.llama8b.replicas: must be greater than 0",
    ]


def test_override_inside_an_absent_or_unknown_kind_block():
    data = {"models": {"a": {"kind": "api", "concurrency": 1}, "b": {"kind": "apx"}}}
    with pytest.raises(ConfigError) as info:
        apply_overrides(data, ["models.a.ttft_s.mean=1", "models.b.concurrency=2"], Workload)
    kinds = "constant, exponential, uniform, normal, lognormal, gamma, empirical"
    assert info.value.lines == [
        "--set models.a.ttft_s.mean: models.a.ttft_s is not given; "
        f"set it whole, e.g. --set models.a.ttft_s='{{kind: ..., ...}}' (kind: one of {kinds})",
        "--set models.b.concurrency: models.b has unknown kind 'apx'; "
        "set it whole, e.g. --set models.b='{kind: ..., ...}' (kind: one of self_hosted, api)",
    ]
