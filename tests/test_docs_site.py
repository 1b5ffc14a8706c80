"""The documentation site: it builds with `mkdocs build --strict`, and its reference pages, generated from the
code (sim/reference.py), cover every schema field (each with help text) and every command."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sim.cli import build_parser
from sim.metrics.glossary import METRICS
from sim.reference import cli_markdown, fields_without_help, metrics_markdown, schema_markdown

ROOT = Path(__file__).resolve().parent.parent


def test_every_schema_field_has_help_text():
    # A new field without a description would show up in the reference as a blank: say what it means.
    assert fields_without_help() == []


def test_the_reference_covers_every_model_and_command():
    schema = schema_markdown()
    for model in ("Workload", "Simulation", "Traffic", "SelfHosted", "Engine", "StepTime", "Api", "Pipeline"):
        assert f"\n## {model}\n" in "\n" + schema, model
    assert "| `rate_rps` |" in schema and "| `fast_path` |" in schema
    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    text = cli_markdown()
    for name in commands:
        assert f"## llmsim {name}\n" in text, name
    assert "`--format`" in text and "(one of: text, json, csv)" in text
    table = metrics_markdown()
    assert all(f"| `{name}` | {unit} |" in table for name, unit, _ in METRICS)


def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra is not installed (pip install -e '.[docs]')")
    pytest.importorskip("material", reason="the docs extra is not installed (pip install -e '.[docs]')")
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    workload = (site / "reference" / "workload" / "index.html").read_text()
    assert "duration_s" in workload and "generated:" not in workload  # the placeholder was filled
    assert "llmsim calibrate" in (site / "reference" / "cli" / "index.html").read_text()
    assert "utilisation_&lt;endpoint&gt;" in (site / "reference" / "metrics" / "index.html").read_text()
    assert (site / "serving" / "index.html").is_file()
