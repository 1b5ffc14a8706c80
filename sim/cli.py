"""The `llmsim` command: a thin layer over plain Python functions.

Exit codes: 0 ok, 2 bad input (one line per problem, no traceback), 1 internal error,
3 a sweep finished but some of its points failed, 141 standard output closed early
(`llmsim schema | head`: nothing is printed about it).
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

from sim import __version__
from sim.config.loader import ConfigError, load_workload
from sim.report.text import json_safe

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_POINTS_FAILED = 0, 1, 2, 3
FORMATS = ("text", "json", "csv")
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what the shell shows for a program whose reader stopped (`| head`)


def _whole_number(minimum: int):
    """An argparse type: a whole number of at least `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


_positive_int, _seed = _whole_number(1), _whole_number(0)


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as exit code 2 in one line (its default exit code is 2 too)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llmsim", description="Capacity-planning simulator for LLM application stacks.")
    parser.add_argument("--version", action="version", version=f"llmsim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("run", help="simulate a workload and print its summary")
    p.add_argument("workload", help="workload YAML file")
    p.add_argument("--seed", type=_seed, help="root seed (default: the workload's)")
    p.add_argument("--replications", type=_positive_int, help="replications (default: the workload's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                   help="override a field, e.g. --set models.llama8b.replicas=4 (repeatable)")
    p.add_argument("--format", choices=FORMATS, help="text (default), json (one flat object) or csv (a header "
                   "row of metric names, then their values; NaN left empty)")
    p.add_argument("--json", action="store_true", help="the same as --format json")
    p.add_argument("--out", type=Path,
                   help="write requests, replications, timeseries and ledger (.parquet) and summary.json here")
    p.add_argument("--warm", action="store_true",
                   help="start warm: replicas loaded, connections open (same as --set simulation.warm=true)")
    p.add_argument("--force", action="store_true",
                   help="run even when the work estimate is over the limit (see simulation.max_requests)")
    p.add_argument("--quiet", action="store_true", help="no progress lines (a run longer than a few seconds "
                   "says how far it is on standard error)")

    p = sub.add_parser("sweep", help="run an experiment: every point, saved as it finishes; capacity search")
    p.add_argument("experiment", help="experiment YAML file")
    p.add_argument("--out", type=Path, help="output folder (default: reports/<experiment name>)")
    p.add_argument("--workers", type=_positive_int, help="worker processes (default: all cores)")
    p.add_argument("--executor", choices=("local", "dask"), default="local",
                   help="local processes, or a Dask cluster (pip install 'llmsim[dask]')")
    p.add_argument("--scheduler", metavar="ADDRESS", help="Dask scheduler address (default: a local cluster)")
    p.add_argument("--resume", action="store_true", help="keep finished points in --out and run the rest")
    p.add_argument("--report", action="store_true", help="write report.md and report.html when done")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--force", action="store_true",
                   help="run even when the work estimate is over the limit (see simulation.max_requests)")
    p.add_argument("--dry-run", action="store_true",
                   help="check every point's values and estimate the work; run nothing, write nothing")

    p = sub.add_parser("plan", help="the cheapest deployment that meets the SLO: GPU types, tensor parallelism, "
                       "replicas and hosted APIs searched")
    p.add_argument("plan", metavar="PLAN", help="plan YAML file (kind: plan)")
    p.add_argument("--out", type=Path, help="output folder (default: reports/<plan name>)")
    p.add_argument("--workers", type=_positive_int, help="candidates searched at once (default: all cores)")
    p.add_argument("--executor", choices=("local", "dask"), default="local",
                   help="local processes, or a Dask cluster (pip install 'llmsim[dask]')")
    p.add_argument("--scheduler", metavar="ADDRESS", help="Dask scheduler address (default: a local cluster)")
    p.add_argument("--resume", action="store_true", help="keep the candidates finished in --out and search the rest")
    p.add_argument("--dry-run", action="store_true",
                   help="check the plan, prune from the config alone and estimate the work; run nothing, write nothing")
    p.add_argument("--report", action="store_true", help="write report.md and report.html when done")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--force", action="store_true",
                   help="run even when the work estimate is over the limit (see simulation.max_requests)")

    p = sub.add_parser("report", help="write the report and figures of a sweep, plan or run folder")
    p.add_argument("dir", type=Path, metavar="DIR",
                   help="folder written by llmsim sweep, llmsim plan or llmsim run --out")

    p = sub.add_parser("validate", help="check a workload file")
    p.add_argument("workload")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE")

    sub.add_parser("schema", help="print the workload JSON Schema")

    p = sub.add_parser("bench", help="simulated requests per wall-second on the shipped workloads")
    p.add_argument("--workloads", type=Path, default=Path("workloads"), help="folder of the shipped workloads")
    p.add_argument("--repeat", type=_positive_int, default=3, help="runs per case; the best is kept")

    p = sub.add_parser("compare", help="compare two workloads: paired differences on the same traffic")
    p.add_argument("a", metavar="A", help="baseline workload YAML")
    p.add_argument("b", metavar="B", help="workload compared with A (differences are B - A)")
    p.add_argument("--seed", type=_seed, help="root seed for both (default: A's)")
    p.add_argument("--replications", type=_positive_int,
                   help="replications for both (default: the larger of the two workloads')")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                   help="override a field in both workloads (repeatable)")
    p.add_argument("--format", choices=FORMATS, help="text (default), json (one object) or csv (a row per metric: "
                   "a, b, the difference, its interval, relative, verdict)")
    p.add_argument("--json", action="store_true", help="the same as --format json")
    p.add_argument("--metrics", metavar="A,B,...",
                   help="the rows to compare, comma-separated summary metric names (default: the headlines)")
    p.add_argument("--force", action="store_true", help="run even when the work estimate is over the limit")

    p = sub.add_parser("fit-traffic", help="fit an arrival process and token distributions to a request trace")
    p.add_argument("trace", metavar="TRACE", help="trace file (Azure CSV, Mooncake JSONL, or a CSV with --columns)")
    p.add_argument("--format", choices=("azure", "mooncake", "csv"),
                   help="trace format (default: mooncake for .jsonl, azure for the Azure columns, else csv)")
    p.add_argument("--columns", metavar="KEY=NAME,...",
                   help="csv columns, e.g. time=ts,prompt_tokens=in,output_tokens=out,time_unit=ms")
    p.add_argument("--json", action="store_true", help="print the fit as one JSON object")

    p = sub.add_parser("calibrate", help="fit an engine block to your server's step logs, request logs or vLLM "
                                         "benchmark results")
    p.add_argument("files", nargs="+", metavar="FILE",
                   help="step logs (CSV: step duration, decoding sequences, prefill tokens), request logs (CSV or "
                        "JSONL: arrival, prompt and output tokens, TTFT, end-to-end) or `vllm bench serve "
                        "--save-result --save-detailed` JSON; several at once are fitted together")
    p.add_argument("--out", type=Path, help="write the engine block here (default: standard output)")
    p.add_argument("--json", action="store_true", help="print the fit, its intervals and the check as one JSON object")
    p.add_argument("--columns", metavar="KEY=NAME,...",
                   help="column names where they differ from the usual ones, e.g. duration=step_ms,decode=bs")
    p.add_argument("--max-batch-tokens", type=_positive_int,
                   help="the server's per-step token budget (default: the fullest logged step, else 8192)")
    p.add_argument("--kv-cache-tokens", type=_positive_int, help="the server's KV-cache capacity in tokens")
    p.add_argument("--max-batch", type=_positive_int, default=256,
                   help="the server's running sequences at most, for replays (default 256)")
    p.add_argument("--replications", type=_positive_int, default=10, help="replications of each replay (default 10)")
    p.add_argument("--seed", type=_seed, default=1, help="root seed of the replays and the bootstrap")
    p.add_argument("--no-check", action="store_true", help="skip replaying the request logs (the in-sample check)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")

    p = sub.add_parser("catalog", help="list the GPU and model catalog; --explain derives step-time coefficients")
    p.add_argument("--explain", nargs="+", metavar="GPU MODEL [TP]",
                   help="derive a replica's coefficients with the arithmetic: catalog GPU, catalog model "
                        "(or a config.json), tensor parallelism (default 1)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp8"), help="weight format (default: the model's own)")
    p.add_argument("--kv-dtype", choices=("auto", "bf16", "fp16", "fp8"), default="auto", help="KV cache format")
    p.add_argument("--max-batch", type=_positive_int, default=256, help="running sequences at most (max_batch)")
    p.add_argument("--context", type=_positive_int, default=1024,
                   help="context tokens per sequence for the predicted decode speeds (default 1024)")
    p.add_argument("--json", action="store_true", help="print as one JSON object")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; its exit code (see the module docstring)."""
    try:
        code = _run_command(argv)
        sys.stdout.flush()  # a reader gone away (`| head`) shows here rather than as noise at exit
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    return code


def _run_command(argv: Optional[Sequence[str]]) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("llmsim: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise
    except OSError as err:
        if not _refused_by_the_system(err):
            return _internal_error(err)
        # A path the system refuses (no room, no permission, a name too long...) is the
        # user's to fix; the commands check their own paths, this catches the rest.
        where = f"{err.filename}" + (f" -> {err.filename2}" if err.filename2 else "")
        print(f"{where}: {err.strerror}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as err:
        return _internal_error(err)


def _internal_error(err: BaseException) -> int:
    """A bug in llmsim: say so in one line, with how to report it."""
    what = re.sub(r"\s+", " ", str(err)).strip()
    print(f"llmsim: internal error: {type(err).__name__}: {what} (a bug in llmsim: please report it with the "
          "command line and the input files)", file=sys.stderr)
    return EXIT_INTERNAL


_SYSTEM_REFUSALS = {errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST,
                    errno.ENAMETOOLONG, errno.ELOOP, errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def _refused_by_the_system(err: OSError) -> bool:
    """An OSError about a named path that the system refused for a reason the user can fix."""
    return err.filename is not None and err.errno in _SYSTEM_REFUSALS and bool(err.strerror)


def _silence_stdout() -> None:
    """Point standard output at /dev/null: the reader has gone, and Python's final flush must not fail again.

    The way the Python documentation advises for SIGPIPE; under a test's captured
    output there is no file descriptor to redirect, and nothing to do.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def cmd_run(args: argparse.Namespace) -> int:
    from sim.experiments.run import run
    from sim.report.text import format_summary, summary_csv, summary_json, write_outputs

    _check_out_folder(args.out)  # before the run: a bad --out should not cost the whole simulation
    fmt = _output_format(args)
    overrides = args.overrides + (["simulation.warm=true"] if args.warm else [])
    say = None if args.quiet else (lambda line: print(f"llmsim run: {line}", file=sys.stderr, flush=True))
    result = run(args.workload, seed=args.seed, replications=args.replications, overrides=overrides,
                 force=args.force, progress=say, keep_requests=args.out is not None, user_costs=fmt == "text")
    _print_warnings(result.warnings)
    if args.out is not None:
        try:
            write_outputs(result, args.out)
        except OSError as err:  # the disk filled up, or the folder went away during the run
            raise ConfigError([f"--out {args.out}: cannot write: {err.strerror or err}"]) from None
        if say is not None:  # on standard error: standard output stays the summary, in its format
            say(f"wrote summary.json and requests, replications, timeseries and ledger (.parquet) to {args.out}")
    if fmt == "json":
        print(json.dumps(summary_json(result)))
    elif fmt == "csv":
        print(summary_csv(result.summary), end="")
    else:
        print(format_summary(result))
    return EXIT_OK


def _output_format(args: argparse.Namespace) -> str:
    """--format, with --json as its synonym for json."""
    if args.json and args.format not in (None, "json"):
        raise ConfigError([f"--json and --format {args.format}: give one of them"])
    return "json" if args.json else args.format or "text"


def cmd_sweep(args: argparse.Namespace) -> int:
    from sim.experiments.sweep import dry_run, sweep

    if args.dry_run:
        print(dry_run(args.experiment, force=args.force))
        return EXIT_OK
    try:
        result = sweep(args.experiment, out=args.out, workers=args.workers, executor=args.executor,
                       scheduler=args.scheduler, resume=args.resume, progress=not args.quiet, force=args.force)
    except KeyboardInterrupt:
        print("llmsim sweep: interrupted; every finished point is saved: "
              "run the same command with --resume to finish", file=sys.stderr)
        return 130
    points = result.results["point"].nunique() if len(result.results) else 0
    print(f"{points} points in {result.out / 'results.parquet'}"
          + (f"; capacity in {result.out / 'capacity.json'}" if result.capacity else ""))
    if args.report:
        from sim.report.review import write_report

        for path in write_report(result.out):
            print(f"wrote {path}")
    if result.failed:
        print(f"llmsim sweep: {result.failed} point(s) failed; their errors are in results.parquet",
              file=sys.stderr)
        return EXIT_POINTS_FAILED
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    from sim.experiments.plan.planner import dry_run, make_plan
    from sim.report.plan import format_plan

    if args.dry_run:
        print(dry_run(args.plan, force=args.force))
        return EXIT_OK
    try:
        result = make_plan(args.plan, out=args.out, workers=args.workers, executor=args.executor,
                           scheduler=args.scheduler, resume=args.resume, progress=not args.quiet, force=args.force)
    except KeyboardInterrupt:
        print("llmsim plan: interrupted; every finished candidate is saved: "
              "run the same command with --resume to finish", file=sys.stderr)
        return 130
    print(format_plan(result.document))
    print(f"plan in {result.out / 'plan.json'}, ranking in {result.out / 'plan.parquet'}")
    if args.report:
        from sim.report.plan import write_plan_report

        for path in write_plan_report(result.out):
            print(f"wrote {path}")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from sim.report.review import require_folder, write_report
    from sim.report.runreport import write_run_report

    folder = Path(args.dir)
    require_folder(folder)
    # A sweep folder has results.parquet, a plan's plan.json; a run folder (run --out) has a time series.
    if (folder / "plan.json").is_file():
        from sim.report.plan import write_plan_report as writer
    else:
        writer = write_report if (folder / "results.parquet").is_file() else write_run_report
    for path in writer(folder):
        print(path)
    return EXIT_OK


def _check_out_folder(out: Optional[Path]) -> None:
    """Check that --out is, or can become, a folder we may write in; ConfigError in one line if not.

    Checked before any work, so a mistyped --out does not cost a whole run; nothing
    is created yet, so a run that fails validation leaves no empty folder behind.
    """
    if out is None:
        return
    try:
        existing = out
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        is_folder = existing.is_dir()
    except OSError as err:  # a name longer than the file system allows, say
        raise ConfigError([f"--out {out}: {err.strerror or err}"]) from None
    if not is_folder:
        what = "a file is there" if existing == out else f"{existing} is a file, not a folder"
        raise ConfigError([f"--out {out}: {what}; --out takes a folder"])
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError([f"--out {out}: cannot write in {existing}: permission denied"])


def _check_out_file(out: Optional[Path]) -> None:
    """Check that --out names a file we may write (its folder exists and is writable); ConfigError if not."""
    if out is None:
        return
    try:
        is_folder, folder_ok = out.is_dir(), out.parent.is_dir()
    except OSError as err:  # a name longer than the file system allows, say
        raise ConfigError([f"--out {out}: {err.strerror or err}"]) from None
    if is_folder:
        raise ConfigError([f"--out {out}: a folder is there; --out takes a file name"])
    if not folder_ok:
        raise ConfigError([f"--out {out}: no folder {out.parent}"])
    if not os.access(out if out.exists() else out.parent, os.W_OK):
        raise ConfigError([f"--out {out}: cannot write there: permission denied"])


def _print_warnings(warnings: Sequence[str]) -> None:
    """Warnings go to standard error, one line each, so --json output stays clean."""
    for line in warnings:
        print(f"llmsim: warning: {line}", file=sys.stderr)


def cmd_validate(args: argparse.Namespace) -> int:
    from sim.experiments.run import workload_warnings

    workload = load_workload(args.workload, args.overrides)
    _print_warnings(workload_warnings(workload))
    classes, models = len(workload.traffic.classes), len(workload.models)
    print(f"{args.workload}: ok ({classes} request class{'es' if classes != 1 else ''}, "
          f"{models} model endpoint{'s' if models != 1 else ''})")
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    from sim.reference import workload_schema

    schema = workload_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "llmsim workload (format v1)"
    print(json.dumps(schema, indent=2))
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    from sim.bench import format_bench, run_bench

    print(format_bench(run_bench(args.workloads, repeat=args.repeat)))
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from sim.experiments.compare import compare, comparison_csv, comparison_json, format_comparison

    fmt = _output_format(args)
    metrics = None if args.metrics is None else args.metrics.split(",")
    comparison = compare(args.a, args.b, seed=args.seed, replications=args.replications, overrides=args.overrides,
                         force=args.force, metrics=metrics)
    if fmt == "json":
        print(json.dumps(comparison_json(comparison)))
    elif fmt == "csv":
        print(comparison_csv(comparison), end="")
    else:
        print(format_comparison(comparison))
    return EXIT_OK


def cmd_fit_traffic(args: argparse.Namespace) -> int:
    from sim.config.traces import TraceError
    from sim.experiments.fit import fit_traffic

    columns = None
    if args.columns:
        known = ("time", "prompt_tokens", "output_tokens", "time_unit")
        pairs = [item.partition("=") for item in args.columns.split(",") if item.strip()]
        bad = [key for key, eq, value in pairs if key.strip() not in known or not eq or not value.strip()]
        if bad:
            raise ConfigError([f"--columns: expected KEY=NAME with KEY one of {', '.join(known)}, got {bad[0]!r}"])
        columns = {key.strip(): value.strip() for key, _, value in pairs}
    try:
        fit = fit_traffic(args.trace, args.format, columns)
    except (TraceError, ValueError) as err:
        raise ConfigError([f"{args.trace}: {err}" if args.trace not in str(err) else str(err)]) from None
    print(json.dumps(fit.summary) if args.json else fit.yaml, end="\n" if args.json else "")
    return EXIT_OK


def cmd_calibrate(args: argparse.Namespace) -> int:
    from sim.experiments.calibration import LogError, calibrate

    columns = None
    if args.columns:
        pairs = [item.partition("=") for item in args.columns.split(",") if item.strip()]
        bad = [key for key, eq, value in pairs if not eq or not key.strip() or not value.strip()]
        if bad:
            raise ConfigError([f"--columns: expected KEY=NAME, got {bad[0]!r}"])
        columns = {key.strip(): value.strip() for key, _, value in pairs}
    _check_out_file(args.out)  # before the fit, which can take minutes
    say = None if args.quiet else (lambda text: print(f"llmsim calibrate: {text}", file=sys.stderr))
    try:
        result = calibrate(args.files, columns=columns, max_batch_tokens=args.max_batch_tokens,
                           kv_cache_tokens=args.kv_cache_tokens, max_batch=args.max_batch,
                           replications=args.replications, seed=args.seed, check=not args.no_check, progress=say)
    except (LogError, ValueError) as err:
        raise ConfigError([f"llmsim calibrate: {err}"]) from None
    if args.json:
        print(json.dumps(json_safe(result.to_json())))
        return EXIT_OK
    text = result.to_yaml()
    if args.out is None:
        print(text, end="")
        return EXIT_OK
    try:
        args.out.write_text(text, encoding="utf-8")
    except OSError as err:
        raise ConfigError([f"--out {args.out}: cannot write: {err.strerror or err}"]) from None
    print("\n".join(result.report()))
    print(f"wrote {args.out}")
    return EXIT_OK


def cmd_catalog(args: argparse.Namespace) -> int:
    from sim.catalog import CatalogError, derive, gpu, model
    from sim.catalog.tables import catalog_json, catalog_text, roofline_json

    if not args.explain:
        print(json.dumps(catalog_json()) if args.json else catalog_text())
        return EXIT_OK
    if len(args.explain) not in (2, 3) or (len(args.explain) == 3 and not args.explain[2].isdigit()):
        raise ConfigError([f"llmsim catalog: --explain takes GPU MODEL [TP], got {' '.join(args.explain)!r}"])
    tensor_parallel = int(args.explain[2]) if len(args.explain) == 3 else 1
    try:
        roofline = derive(gpu(args.explain[0]), model(args.explain[1]), tensor_parallel, args.dtype, args.kv_dtype,
                          max_batch=args.max_batch)
    except (CatalogError, ValueError) as err:
        raise ConfigError([f"llmsim catalog: {err}"]) from None
    if args.json:
        print(json.dumps(roofline_json(roofline, args.context)))
    else:
        print("\n".join(roofline.explain(args.context)))
    return EXIT_OK


COMMANDS = {"run": cmd_run, "sweep": cmd_sweep, "plan": cmd_plan, "validate": cmd_validate, "schema": cmd_schema,
            "bench": cmd_bench, "compare": cmd_compare, "report": cmd_report, "fit-traffic": cmd_fit_traffic,
            "catalog": cmd_catalog, "calibrate": cmd_calibrate}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
