"""Hostile and absurd config files: bounded work, strict numbers, one line per problem, exit 2 (issue 10).

Every file here is written inline so the line numbers asserted can be read off
the text (the first line of each block is line 1).
"""
from __future__ import annotations

import json
import math
import os
import textwrap
import time
import tracemalloc
from pathlib import Path

import pytest

from sim.cli import main
from sim.config.loader import MAX_DEPTH, MAX_NODES, ConfigError, load_workload, load_yaml_with_lines
from sim.report.text import json_safe

WORKLOAD = """\
version: 1
simulation:
  duration_s: 600
  replications: 2
traffic:
  classes:
    chat:
      arrival: {kind: poisson, rate_rps: 2}
      prompt_tokens: {kind: empirical, values: [100, 200]}
      output_tokens: 50
models:
  m:
    kind: self_hosted
    engine:
      step_time: {base_s: 0.01, per_decode_seq_s: 0.001, per_prefill_token_s: 0.0001}
"""


def write(tmp_path: Path, text: str, name: str = "w.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def validate(path: Path | str, capsys, *overrides: str) -> list[str]:
    """`llmsim validate PATH`: asserts exit 2 and returns the lines it printed on standard error."""
    args = ["validate", str(path)] + [a for o in overrides for a in ("--set", o)]
    assert main(args) == 2
    out = capsys.readouterr()
    assert "Traceback" not in out.err and out.out == ""
    return out.err.strip().splitlines()


def alias_bomb(levels: int, width: int = 10) -> str:
    """Each level a list of `width` aliases to the previous one: width^levels values once expanded."""
    lines = [f"a0: &a0 [{', '.join(['x'] * width)}]"]
    lines += [f"a{k}: &a{k} [{', '.join([f'*a{k - 1}'] * width)}]" for k in range(1, levels)]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------- loader limits


def test_alias_bomb_is_refused_in_under_a_second_and_100_mb(tmp_path, capsys):
    path = write(tmp_path, alias_bomb(8))  # 10^8 values expanded; walking them took minutes and ~10 GB
    start = time.perf_counter()
    with pytest.raises(ConfigError):
        load_yaml_with_lines(path)
    seconds = time.perf_counter() - start
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError):
            load_yaml_with_lines(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seconds < 1.0
    assert peak < 100 * 2**20
    # Level 4 (line 5) is the first to pass MAX_NODES: 111,111 values.
    assert validate(path, capsys) == [
        f"{path}:5: more than {MAX_NODES:,} values, aliases counted as expanded "
        "(put long data in a CSV file or a trace)"
    ]


def test_aliases_below_the_limit_load_and_read_their_anchors_lines(tmp_path):
    path = write(tmp_path, alias_bomb(4) + "b: *a3\n")  # 10^4 values, under the limit
    data, lines = load_yaml_with_lines(path)
    assert len(data["b"]) == 10 and data["b"][9][9][9] == ["x"] * 10
    assert lines[("b",)] == 5
    assert lines[("b", 9)] == 3  # an item of a3 is an alias: the line of its anchor, a2
    assert lines[("b", 9, 9, 9, 9)] == 1
    assert ("b", 10) not in lines and ("b", 9, "x") not in lines


def test_error_under_an_alias_points_at_the_anchor(tmp_path, capsys):
    path = write(tmp_path, WORKLOAD.replace("  duration_s: 600", "  duration_s: &d {x: 1}").replace(
        "      output_tokens: 50", "      output_tokens: *d"))
    assert validate(path, capsys) == [
        f"{path}:3: simulation.duration_s: must be a number, got a mapping",
        f"{path}:10: traffic.classes.chat.output_tokens: missing 'kind' (one of: constant, exponential, uniform, "
        "normal, lognormal, gamma, empirical)",
    ]


@pytest.mark.parametrize("text, line, message", [
    ("a: " + "[" * 500 + "]" * 500 + "\n", 1, f"nested deeper than {MAX_DEPTH} levels"),
    ("a:\n  b: " + "{c: " * 500 + "1" + "}" * 500 + "\n", 2, f"nested deeper than {MAX_DEPTH} levels"),
    # Each alias adds a level: a_k is k + 2 deep though written 2 deep; a62 (line 63) is the first past 64.
    ("a0: &a0 [1]\n" + "".join(f"a{k}: &a{k} [*a{k - 1}]\n" for k in range(1, 100)), 63,
     f"nested deeper than {MAX_DEPTH} levels once aliases are expanded"),
    ("a: &a [1, *a]\n", 1, "an alias refers to a block that contains it (endless nesting)"),
])
def test_deep_or_endless_nesting_is_one_line(tmp_path, capsys, text, line, message):
    path = write(tmp_path, text)
    assert validate(path, capsys) == [f"{path}:{line}: {message}"]


@pytest.mark.parametrize("char", ["\x00", "\x07", "\x1b"])
def test_control_characters_are_one_line_with_their_line(tmp_path, capsys, char):
    path = write(tmp_path, WORKLOAD.replace("version: 1\n", f"version: 1\nname: a{char}b\n"))
    assert validate(path, capsys) == [
        f"{path}:2: control character U+{ord(char):04X} is not allowed (YAML takes printable text, tabs and line breaks)"
    ]


def test_text_that_is_not_utf8_names_its_line(tmp_path, capsys):
    path = tmp_path / "w.yaml"
    path.write_bytes(WORKLOAD.replace("version: 1\n", "version: 1\nname: caf\xe9\n").encode("latin-1"))
    assert validate(path, capsys) == [f"{path}:2: not UTF-8 text (byte 0xe9); save the file as UTF-8"]


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_dev_zero_is_refused_after_a_bounded_read(capsys):
    start = time.perf_counter()
    assert validate("/dev/zero", capsys) == [
        "/dev/zero: larger than 10 MiB, the most a config file may be (put long data in a CSV file or a trace)"
    ]
    assert time.perf_counter() - start < 10  # it reads 10 MiB, never the endless rest


def test_a_folder_is_one_line(tmp_path, capsys):
    assert validate(tmp_path, capsys) == [f"{tmp_path}: cannot read: Is a directory"]


def test_set_values_have_the_same_limits(tmp_path, capsys):
    path = write(tmp_path, WORKLOAD)
    [line] = validate(path, capsys, "name=" + "[" * 100 + "]" * 100)
    assert line.startswith("--set name: cannot parse value ") and line.endswith(f"nested deeper than {MAX_DEPTH} levels")
    [line] = validate(path, capsys, "name=a\x07b")
    assert line == ("--set name: cannot parse value 'a\\x07b': control character U+0007 is not allowed "
                    "(YAML takes printable text, tabs and line breaks)")


# --------------------------------------------------------------- error list cap


def test_error_list_is_cut_at_20_lines_with_a_count(tmp_path, capsys):
    path = write(tmp_path, WORKLOAD + "".join(f"k{i}: 1\n" for i in range(1000)))
    lines = validate(path, capsys)
    assert len(lines) == 21
    assert lines[0] == f"{path}:16: k0: unknown key 'k0' (known: version, name, description, simulation, traffic, " \
                       "models, slo, rate_limits, pipeline)"
    assert lines[19].startswith(f"{path}:35: k19: unknown key")
    assert lines[20] == "... and 980 more problems"


def test_config_error_keeps_every_line_and_counts_one_more_in_the_singular():
    err = ConfigError([f"f:{n}: x: bad" for n in range(21)])
    assert len(err.lines) == 21
    assert str(err).splitlines()[-1] == "... and 1 more problem"
    assert len(str(ConfigError(["a"] * 20)).splitlines()) == 20


# --------------------------------------------------------------- strict numbers


@pytest.mark.parametrize("old, new, line, message", [
    ("{base_s: 0.01,", "{base_s: yes,", 15, "models.m.engine.step_time.base_s: must be a number, got true"),
    ("replications: 2", "replications: true", 4, "simulation.replications: must be an integer, got true"),
    ("rate_rps: 2}", "rate_rps: on}", 8, "traffic.classes.chat.arrival.rate_rps: must be a number, got true"),
    ("values: [100, 200]", "values: [100, off]", 9,
     "traffic.classes.chat.prompt_tokens.values.1: must be a number, got false"),
    ("version: 1", "version: true", 1, "version: must be 1, got true"),
])
def test_booleans_are_not_numbers(tmp_path, capsys, old, new, line, message):
    path = write(tmp_path, WORKLOAD.replace(old, new))
    assert validate(path, capsys) == [f"{path}:{line}: {message} (YAML reads yes, no, on and off as booleans)"]


@pytest.mark.parametrize("old, new, line, message", [
    ("replications: 2", "replications: 1e30", 4, "simulation.replications: must be an integer below 2^63 (64 bits), "
     "got 1e+30"),
    ("replications: 2", "replications: " + "9" * 30, 4,
     "simulation.replications: must be an integer below 2^63 (64 bits), got one of 30 digits"),
    ("duration_s: 600", "duration_s: " + "9" * 400, 3,
     "simulation.duration_s: must be a finite number, got an integer of 400 digits"),
    ("duration_s: 600", "duration_s: .inf", 3, "simulation.duration_s: must be a finite number, got inf"),
    ("duration_s: 600", "duration_s: 1e400", 3, "simulation.duration_s: must be a finite number, got inf"),
    ("output_tokens: 50", "output_tokens: .nan", 10, "traffic.classes.chat.output_tokens: must be a finite "
     "number, got nan"),
    # A token count beyond int64 once rounded (it came out as -3.5e19 tokens per second).
    ("output_tokens: 50", "output_tokens: 3.5e19", 10,
     "traffic.classes.chat.output_tokens: must be less than or equal to 1000000000000"),
])
def test_numbers_beyond_range_are_errors(tmp_path, capsys, old, new, line, message):
    path = write(tmp_path, WORKLOAD.replace(old, new))
    assert validate(path, capsys) == [f"{path}:{line}: {message}"]


@pytest.mark.parametrize("override, message", [
    ("simulation.replications=10001", "simulation.replications: must be less than or equal to 10000"),
    ("simulation.duration_s=1e308", "simulation.duration_s: must be less than or equal to 10000000000"),
    ("models.m.max_batch=2000000", "models.m.max_batch: must be less than or equal to 1000000"),
    ("traffic.classes.chat.users.count=1e9", "traffic.classes.chat.users.count: must be less than or equal to "
     "100000000"),
    ("traffic.classes.chat.arrival.rate_rps=1e10", "traffic.classes.chat.arrival.rate_rps: must be less than or "
     "equal to 1000000000"),
    ("models.m.gpu_hourly_usd=1e308", "models.m.gpu_hourly_usd: must be less than or equal to 1000000"),
    ("simulation.timeseries_interval_s=1e-9", "simulation.timeseries_interval_s: 1e-09 s makes 6e+11 buckets in "
     "duration_s; at most 10,000,000 (use at least 6e-05 s)"),
    ("slo.ttft_s=-1", "slo.ttft_s: must be greater than 0"),
    ("traffic.classes.chat.prompt_tokens={kind: lognormal, mu: 0, sigma: 50}",
     "traffic.classes.chat.prompt_tokens: the mean exp(mu + sigma^2 / 2) must be at most 1e+12 (mu 0, sigma 50)"),
])
def test_absurd_values_are_bounded(tmp_path, capsys, override, message):
    assert validate(write(tmp_path, WORKLOAD), capsys, override) == [f"--set {message}"]


def test_api_prices_are_bounded(tmp_path, capsys):
    api = ("  m:\n    kind: api\n    concurrency: 8\n    service_time: 1\n"
           "    price_per_mtok_in: 1e308\n    price_per_mtok_out: 2\n")
    path = write(tmp_path, WORKLOAD[: WORKLOAD.index("  m:\n")] + api)
    assert validate(path, capsys) == [f"{path}:16: models.m.price_per_mtok_in: must be less than or equal to 1000000"]



def test_a_tiny_autoscaler_interval_is_an_error(tmp_path, capsys):
    path = write(tmp_path, WORKLOAD + "    autoscale: {max_replicas: 4, target: 0.7, interval_s: 1e-6}\n")
    assert validate(path, capsys) == [
        f"{path}:16: models.m.autoscale.interval_s: the autoscaler looks 6e+08 times in duration_s (600 s); "
        "at most 10,000,000"
    ]


def test_default_timeseries_interval_widens_for_very_long_runs(tmp_path):
    long = load_workload(write(tmp_path, WORKLOAD), ["simulation.duration_s=1e9"])
    assert long.simulation.timeseries_interval_s == 100.0  # 1e9 s / 1e7 buckets
    assert load_workload(write(tmp_path, WORKLOAD)).simulation.timeseries_interval_s == 10.0


def test_json_safe_turns_every_non_finite_figure_into_null():
    safe = json_safe({"a": math.inf, "b": -math.inf, "c": math.nan, "d": 1.5, "e": "x"})
    assert safe == {"a": None, "b": None, "c": None, "d": 1.5, "e": "x"}
    assert json.loads(json.dumps(safe, allow_nan=False)) == safe
