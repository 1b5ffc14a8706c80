"""The docs' commands and examples run: every `llmsim` line of docs/serving.md's and the guides' catalog and
calibration blocks, the YAML examples, and docs/validation.py.

Commands on ../shared/data skip (with the reason) where it is absent; files a command writes go to
a temporary folder; the vLLM results the docs name are made by the simulator.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

import sim
from sim.cli import main
from sim.config.schema import Workload

ROOT = Path(__file__).resolve().parents[1]
SERVING = (ROOT / "docs" / "serving.md").read_text()
GUIDES = "\n".join((ROOT / "docs" / "guides" / name).read_text() for name in ("models.md", "commands.md"))
SHARED = ROOT.parent / "shared" / "data"


def commands(text: str, prefix: str = "llmsim ") -> list[str]:
    """The lines of ```bash blocks that start with `prefix`, comments after the command dropped."""
    lines = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        lines += [line.split("  #")[0].strip() for line in block.splitlines() if line.startswith(prefix)]
    return lines


DOC_COMMANDS = commands(SERVING)
README_COMMANDS = [c for c in commands(GUIDES) if c.split()[1] in ("catalog", "calibrate")]


def vllm_results(folder: Path) -> None:
    """run-4rps.json, run-8rps.json and run-16rps.json as `vllm bench serve --save-detailed` writes them."""
    for rate in (4, 8, 16):
        workload = {"version": 1, "simulation": {"duration_s": 15, "seed": rate},
                    "traffic": {"classes": {"c": {"arrival": {"kind": "poisson", "rate_rps": rate},
                                                  "prompt_tokens": 300, "output_tokens": 60}}},
                    "models": {"m": {"kind": "self_hosted", "engine": {"gpu": "h100-sxm", "model": "llama-3.1-8b"}}}}
        (folder / "w.yaml").write_text(yaml.safe_dump(workload))
        requests = sim.run(folder / "w.yaml").requests
        tpot = (requests.e2e_s - requests.ttft_s) / (requests.output_tokens - 1)
        (folder / f"run-{rate}rps.json").write_text(json.dumps({
            "request_rate": rate, "burstiness": 1.0, "max_concurrency": None,
            "input_lens": requests.prompt_tokens.tolist(), "output_lens": requests.output_tokens.tolist(),
            "ttfts": requests.ttft_s.tolist(), "itls": [[g] * (o - 1) for g, o in zip(tpot, requests.output_tokens)],
            "errors": [""] * len(requests)}))


def run_documented(command: str, tmp_path: Path, monkeypatch) -> None:
    if "../shared/data" in command and not SHARED.is_dir():
        pytest.skip(f"public reference data not found at {SHARED}")
    if "run-4rps.json" in command:
        vllm_results(tmp_path)
    monkeypatch.chdir(ROOT)
    args = shlex.split(command)[1:]
    args = [str(tmp_path / a) if a.endswith((".yaml", ".json")) and not a.startswith("..") else a for a in args]
    if args[0] == "calibrate":
        args.append("--quiet")
    assert main(args) == 0, command


HOW_TO = {path.name: commands(path.read_text()) for path in sorted((ROOT / "docs" / "how-to").glob("*.md"))}


def test_every_how_to_guide_has_commands():
    assert set(HOW_TO) >= {"size-self-hosted.md", "api-tier.md", "ab-test.md", "replay-trace.md", "dask.md", "plan.md"}
    assert all(HOW_TO.values()), HOW_TO


@pytest.mark.parametrize("command", [c for cs in HOW_TO.values() for c in cs])
def test_every_how_to_command_runs(command, tmp_path, monkeypatch, capsys):
    files = [ROOT / word for word in shlex.split(command) if word.endswith(".yaml") and (ROOT / word).is_file()]
    needs_data = "../shared/data" in command or any("shared/data" in f.read_text() for f in files)
    if needs_data and not SHARED.is_dir():  # (a workload that replays a shared trace names it inside)
        pytest.skip(f"public reference data not found at {SHARED}")
    if "--executor dask" in command:
        pytest.importorskip("distributed", reason="the dask extra is not installed")
    monkeypatch.chdir(ROOT)
    args = shlex.split(command)[1:]
    if "--out" in args:  # what a guide writes goes to a temporary folder
        k = args.index("--out") + 1
        args[k] = str(tmp_path / args[k])
    if args[0] in ("run", "sweep", "plan"):
        args.append("--quiet")
    assert main(args) == 0, command


# Commands of the commands page that cannot run here, and why (every other line runs, in the page's order).
NOT_HERE = {"my-variant.yaml": "a variant file the reader writes", "tcp://10.0.0.5:8786": "the reader's Dask cluster",
            "llmsim bench": "tests/test_cli.py runs the benchmark"}


def test_the_commands_page_runs_in_order(tmp_path, monkeypatch, capsys):
    # In a copy of the workloads and experiments, so what the commands write (reports/...) stays out of the checkout.
    for folder in ("workloads", "experiments"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    monkeypatch.chdir(tmp_path)
    ran = 0
    for command in commands((ROOT / "docs" / "guides" / "commands.md").read_text()):
        if any(marker in command for marker in NOT_HERE):
            continue
        if "../shared/data" in command:
            if not SHARED.is_dir():
                continue
            command = command.replace("../shared/data", str(SHARED))
        args = shlex.split(command, comments=True)[1:]
        if ">" in args:  # a redirection: the output itself does not matter here
            args = args[:args.index(">")]
        if args[0] in ("run", "sweep", "plan"):
            args.append("--quiet")
        try:
            assert main(args) == 0, command
        except SystemExit as done:  # --version exits, as argparse does
            assert done.code == 0, command
        capsys.readouterr()
        ran += 1
    assert ran >= 15


def test_the_docs_have_their_commands():
    assert len(DOC_COMMANDS) >= 6 and len(README_COMMANDS) >= 3
    assert any(c.startswith("llmsim calibrate") and "load_steps.csv" in c for c in DOC_COMMANDS)


@pytest.mark.parametrize("command", DOC_COMMANDS + README_COMMANDS)
def test_every_documented_command_runs(command, tmp_path, monkeypatch, capsys):
    run_documented(command, tmp_path, monkeypatch)
    if "--out" in command:
        assert yaml.safe_load((tmp_path / "engine.yaml").read_text())["engine"]["step_time"]["base_s"] > 0


def test_the_catalog_example_validates():
    example = next(b for b in re.findall(r"^```yaml\n(.*?)^```", SERVING, re.S | re.M) if "gpu: h100-sxm" in b)
    data = {"version": 1, "traffic": {"classes": {"chat": {"arrival": {"kind": "poisson", "rate_rps": 1},
                                                           "prompt_tokens": 100, "output_tokens": 10}}},
            "models": yaml.safe_load(example)["models"]}
    m = Workload.model_validate(data).models["llama70b"]
    assert m.gpus_per_replica == 4 and m.engine.step_time.noise_cv == 0.05
    assert m.engine.coefficients_source().startswith("roofline of h100-sxm x llama-3.1-70b, TP 4")


def test_the_noise_example_validates():
    example = next(b for b in re.findall(r"^```yaml\n(.*?)^```", SERVING, re.S | re.M) if "slow_episodes:" in b
                   and "stalls:" in b)
    block = yaml.safe_load(example)["step_time"]
    data = {"version": 1, "traffic": {"classes": {"chat": {"arrival": {"kind": "poisson", "rate_rps": 1},
                                                           "prompt_tokens": 100, "output_tokens": 10}}},
            "models": {"m": {"kind": "self_hosted", "engine": {"step_time": block}}}}
    st = Workload.model_validate(data).models["m"].engine.step_time
    assert st.slow_episodes.multiplier == 1.24 and st.stalls[0].duration_s == 2.0


@pytest.mark.needs_shared_data
@pytest.mark.skipif(not SHARED.is_dir(), reason=f"public reference data not found at {SHARED}")
def test_the_validation_script_draws_its_figures(tmp_path, capsys):
    import runpy
    import sys

    argv = sys.argv
    sys.argv = ["validation.py", str(SHARED / "gpu-h100-b512"), "--out", str(tmp_path)]
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(ROOT / "docs" / "validation.py"), run_name="__main__")
    finally:
        sys.argv = argv
    assert done.value.code == 0
    assert {p.name for p in tmp_path.iterdir()} == {"validation_steps.png", "validation_latency.png"}
    table = capsys.readouterr().out
    assert table.count("| step log (both runs) |") == 10 and table.count("| L1 request log alone |") == 5
