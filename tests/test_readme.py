"""The README's quick start and the docs' examples are tested: the workload and experiment examples, the Python
API; every file they name exists; the README stays one screen or two."""
from __future__ import annotations

import re

import yaml
from documents import ALL, PAGES, README, ROOT, blocks

from sim.config.schema import Workload


def quick_start() -> list[str]:
    section = README.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_quick_start_is_two_commands_and_ci_runs_the_second_verbatim():
    commands = quick_start()
    assert len(commands) == 2
    assert "llmsim sweep experiments/capacity-review.yaml --report" in commands[0]
    assert commands[1] in (ROOT / ".ci/run").read_text().splitlines()


def test_workload_example_validates():
    example = next(b for b in blocks("yaml") if "simulation:" in b)
    workload = Workload.model_validate(yaml.safe_load(example))
    assert set(workload.traffic.classes) == {"chat", "batch_jobs"}


def test_experiment_example_validates(tmp_path):
    from sim.experiments.spec import load_experiment

    example = next(b for b in blocks("yaml") if "axes:" in b)
    path = tmp_path / "example.yaml"
    path.write_text(example.replace("../workloads/", f"{ROOT / 'workloads'}/"))
    points = load_experiment(path).points()
    assert len(points) == 2 * 12 * 3


def test_documented_files_exist():
    for path in set(re.findall(r"(?:workloads|experiments)/[\w.-]+\.yaml", ALL)):
        assert (ROOT / path).is_file(), path


def test_the_readme_is_short_and_links_every_docs_page():
    assert len(README.splitlines()) < 250
    for page in PAGES:
        if page != "index.md":
            assert f"](docs/{page})" in README, page


def test_python_api_example_runs(monkeypatch):
    monkeypatch.chdir(ROOT)
    example = next(b for b in blocks("python") if "sim.run(" in b)
    scope: dict = {}
    exec(compile(example, "docs/reference/python-api.md", "exec"), scope)
    summary = scope["result"].summary
    assert summary["ttft_p95_s_ci95_low"] <= summary["ttft_p95_s"] <= summary["ttft_p95_s_ci95_high"]
