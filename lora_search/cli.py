"""`lora-search`: the command line.

    lora-search validate sweeps/tiny.py     # every problem at once; exit 2 if any, Ray never started
    lora-search run sweeps/tiny.py          # validate, then run (or resume) the sweep
    lora-search run --fresh sweeps/tiny.py  # move earlier results aside first
    lora-search resume NAME [--output-dir DIR]  # resume the unfinished sweep NAME from its Ray state
    lora-search eval sweeps/tiny.py [--adapters DIR ...]  # rescore saved adapters on the golden sets
    lora-search export RUN_ID_OR_ADAPTER_DIR [--merge] [--output DIR] [--base PATH_OR_ID]  # checked export
    (eval and export read adapters from safetensors only; --allow-pickle also admits adapter_model.bin)
    lora-search nightly sweeps/nightly.py --baseline mlflow|FILE [--promote] [--timing-tolerance 0.3]
                                            # regression check; exit 1 on one
    lora-search ui [--port 5000] [--host 127.0.0.1]  # the MLflow UI for the embedded store (reports/mlflow.db);
                                            # on this machine only unless --host says otherwise
    lora-search report NAME_OR_DIR [--output-dir DIR]  # the sweep's results as one offline HTML page
    lora-search compare ID [ID ...] --prompt TEXT   # greedy answers of trials' adapters (trial or MLflow run ids)
                                            # and of their base, on one base load
    lora-search plan sweeps/llama70b.py --gpus 64      # the --dry-run plan: memory, packing, budget, cost; no Ray

A sweep file is a Python file that defines one `Sweep` (conventionally `SWEEP`) at module level.
Exit codes: 0 ok, 2 invalid sweep or export (nothing ran), 3 results exist (nothing overwritten), 130 interrupted
(state saved: rerun to resume), 1 anything else.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from lora_search.config import ConfigError, Problem, Sweep, collecting_problems

EXIT_INVALID = 2
EXIT_EXISTS = 3
EXIT_INTERRUPTED = 130
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
"""`lora-search ui --host` values that keep the UI on this machine; any other is an explicit opt-in."""
ALLOW_PICKLE_HELP = (
    "also load adapters whose weights are a pickle (adapter_model.bin): unpickling can run code, so only for "
    "files you trust (default: safetensors only)"
)


def load_sweep(path: str | Path) -> tuple[Sweep, list[Problem]]:
    """Import a sweep file and return its Sweep plus the construction problems it had (not raised).

    A sweep file that does not run (a syntax error, a byte that is not UTF-8, a misspelt name or keyword, an
    exception of its own) is a ConfigError naming its file:line, not a traceback."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([Problem("sweep file", str(path), "not found", "give the path of a sweeps/*.py file")])
    spec = importlib.util.spec_from_file_location(f"lora_search_sweep_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with collecting_problems() as problems:
        try:
            spec.loader.exec_module(module)
        except ConfigError as e:  # raised by a lora_search call the file makes (a file it reads, say)
            problems.extend(e.problems)
            raise ConfigError(problems, header=f"sweep file {path} cannot be loaded") from None
        except Exception as e:  # whatever the user's file raises is reported at its line
            raise ConfigError([_sweep_file_problem(path, e)], header=f"sweep file {path} cannot be loaded") from None
    found = [v for v in vars(module).values() if isinstance(v, Sweep)]
    if not found:
        raise ConfigError([Problem("sweep file", str(path), "defines no Sweep", "assign SWEEP = Sweep(...)")])
    sweep = vars(module).get("SWEEP", found[0])
    return sweep, problems


def _sweep_file_problem(path: Path, error: BaseException) -> Problem:
    """The sweep file's own line where `error` happened (the deepest frame in that file), as a Problem."""
    import traceback

    what = f"{type(error).__name__}: {error}"
    if isinstance(error, SyntaxError):  # includes a source that is not UTF-8 ("(unicode error) ...")
        where = f"{path}:{error.lineno}" + (f":{error.offset}" if error.offset else "")
        return Problem(where, None, f"{type(error).__name__}: {error.msg}", "fix the Python syntax")
    line = None
    for frame in traceback.extract_tb(error.__traceback__):
        if Path(frame.filename).resolve() == path.resolve():
            line = frame.lineno
    fixes = {
        "NameError": "import it (`from lora_search import ...`) or fix the spelling",
        "ImportError": "lora_search exports BaseModel, Budget, Dataset, Evals, Pricing, Resources, SearchSpace, Sweep",
        "ModuleNotFoundError": "install the module, or fix the import",
        "TypeError": "check the call's arguments against the class's fields (see lora_search/config.py)",
    }
    return Problem(f"{path}:{line}" if line else str(path), None, what, fixes.get(type(error).__name__, "fix the file"))


def _validate(sweep: Sweep, problems: list[Problem]) -> int:
    from lora_search import serving
    from lora_search.preflight import model_layers, validate

    validate(sweep, problems)
    serving.warn_unservable(sweep, model_layers)  # a warning on stderr: the sweep still runs
    print(f"sweep {sweep.name!r} is valid")
    return 0


def _run(sweep: Sweep, problems: list[Problem], fresh: bool, sweep_file: str | None) -> int:
    from lora_search.sweep import run

    run(sweep, fresh=fresh, construction_problems=problems, sweep_file=sweep_file)
    return 0


def _resume(name: str, output_dir: str | None) -> int:
    """Resume the unfinished sweep NAME from its Ray Tune state, with the sweep file it was started from."""
    from lora_search.layout import SOURCE_FILE, TRIALS_FILE, ray_storage
    from lora_search.sweep import file_sha256, resumable, run, sweep_dir

    where = Path(output_dir or os.environ.get("LORA_SEARCH_OUTPUT_DIR", "reports")).resolve()
    out, header = where / name, f"nothing to resume for sweep {name!r}"
    if (out / TRIALS_FILE).exists():
        fix = "`lora-search run --fresh FILE` runs it again"
        raise ConfigError([Problem("sweep", name, f"finished: its results are in {out}", fix)], header=header)
    if not resumable(out):
        fix = (
            f"start it with `lora-search run sweeps/<file>.py`, or pass --output-dir where {name!r} ran "
            "(default: $LORA_SEARCH_OUTPUT_DIR, else reports)"
        )
        state = ray_storage(out) / name
        raise ConfigError([Problem("sweep state", str(state), "no saved Ray Tune state here", fix)], header=header)
    record = out / SOURCE_FILE
    if not record.is_file():
        problem = "not recorded: the sweep was started from Python, not from a sweep file"
        fix = "`lora-search run FILE` (or run(SWEEP) again) resumes it as well"
        raise ConfigError([Problem("sweep file", str(record), problem, fix)], header=header)
    source = json.loads(record.read_text())
    path = Path(source["sweep_file"])
    if not path.is_file():
        fix = "put it back, or `lora-search run FILE` with the file where it is now"
        raise ConfigError([Problem("sweep file", str(path), "not found", fix)], header=header)
    if file_sha256(path) != source["sha256"]:
        problem = "changed since the sweep started (resuming would mix two sweeps)"
        fix = "restore it, or `lora-search run --fresh FILE` to start over"
        raise ConfigError([Problem("sweep file", str(path), problem, fix)], header=header)
    sweep, problems = load_sweep(path)
    if sweep_dir(sweep) != out:
        problem = f"now puts sweep {sweep.name!r} in {sweep_dir(sweep)}, not {out}"
        fix = "run from the directory the sweep started in, or set LORA_SEARCH_OUTPUT_DIR as it was"
        raise ConfigError([Problem("sweep file", str(path), problem, fix)], header=header)
    run(sweep, construction_problems=problems, sweep_file=path)
    return 0


def _eval(
    sweep: Sweep, problems: list[Problem], adapters: list[str] | None, output: str | None, allow_pickle: bool = False
) -> int:
    import pandas as pd

    from lora_search.evals import rescore
    from lora_search.layout import PEFT_CONFIG, TRIALS_FILE
    from lora_search.sweep import sweep_dir

    if problems:
        raise ConfigError(problems, header=f"invalid sweep {sweep.name!r}")
    if sweep.evals is None:
        raise ConfigError([Problem("evals", None, "the sweep names no golden sets", "set evals=Evals(...)")])
    if adapters:
        dirs = [Path(a) for a in adapters]
    else:
        parquet = sweep_dir(sweep) / TRIALS_FILE
        if not parquet.is_file():
            raise ConfigError(
                [
                    Problem(
                        "sweep results",
                        str(parquet),
                        "not found",
                        "run the sweep first, or name adapter dirs with --adapters",
                    )
                ],
                header="nothing to score",
            )
        trials = pd.read_parquet(parquet)
        dirs = [Path(p) for p in trials["adapter_path"] if p]
    missing = [str(d) for d in dirs if not (d / PEFT_CONFIG).is_file()]
    if missing or not dirs:
        raise ConfigError(
            [Problem("adapters", m, f"not a PEFT adapter dir (no {PEFT_CONFIG})", "") for m in missing]
            or [Problem("adapters", None, "no adapters to score", "run the sweep first")]
        )
    rows = rescore(sweep, dirs, allow_pickle=allow_pickle)
    print(pd.DataFrame(rows).to_string(index=False))
    if output:
        Path(output).write_text(json.dumps(rows, indent=1))
    return 0


def _export(
    source: str,
    merge: bool,
    output: str | None,
    base: str | None,
    tracking_uri: str | None,
    check: bool,
    allow_pickle: bool = False,
    engine: str | None = None,
    dtype: str | None = None,
    allow_drift: bool = False,
) -> int:
    import tempfile

    from lora_search import layout, registry

    src = Path(source)  # a dir is exported as is (export says if it is no adapter); anything else is a run id
    name = src.resolve().name if src.is_dir() else source
    suffix = f"-{engine}" if engine else "-merged" if merge else ""
    out = Path(output) if output else Path("exported") / (name + suffix)
    with tempfile.TemporaryDirectory() as tmp:  # a downloaded adapter is only needed until it is exported
        if src.is_dir():
            adapter_dir = src
        else:
            uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
            uri = uri or layout.default_tracking_uri(os.environ.get("LORA_SEARCH_OUTPUT_DIR", "reports"))
            adapter_dir = registry.download_run_adapter(source, uri, Path(tmp))
        if engine:
            registry.export_for(
                adapter_dir, out, engine, base=base, check=check, allow_pickle=allow_pickle, dtype=dtype,
                allow_drift=allow_drift,
            )  # fmt: skip
        else:
            registry.export(
                adapter_dir, out, merge=merge, base=base, check=check, allow_pickle=allow_pickle, dtype=dtype
            )
    record = json.loads((out / registry.EXPORT_FILE).read_text())
    if engine:
        how = record["serving"]
        why = f" ({engine} would not load the adapter: {how['why']})" if "why" in how else ""
        diff = how["reload_max_abs_logit_diff"]
        checked = how.get("reload_check") or f"max |logit diff| {diff:.3g}, bound {how['drift_bound']:.3g}"
        allowed = " ABOVE THE BOUND, kept by --allow-drift" if how.get("drift_allowed") else ""
        print(f"exported {how['written']} for {engine} to {out}{why}")
        print(f"reloaded as {engine} reads it, against the trial's probe: {checked}{allowed}")
        print(f"serve it: {how['command']}")
        return 0
    diff = f" (max |logit diff| after merging: {record['max_abs_logit_diff']:.3g})" if merge else ""
    print(f"exported {'merged model' if merge else 'adapter'} to {out}{diff}")
    return 0


def _nightly(sweep: Sweep, problems: list[Problem], source: str, promote: bool, tolerance: str) -> int:
    from lora_search import nightly
    from lora_search.sweep import run, sweep_dir, write_sweep_report

    # A broken baseline or tolerance is reported with the sweep's own problems, before any compute (`run`'s check).
    own: list[Problem] = []
    baseline, timing_tolerance = None, nightly.TIMING_TOLERANCE
    try:
        timing_tolerance = nightly.timing_tolerance(tolerance)
    except ConfigError as e:
        own += e.problems
    try:
        baseline = nightly.load_baseline(source, sweep)
    except ConfigError as e:
        own += e.problems
    run(sweep, fresh=True, construction_problems=problems + own)
    out = sweep_dir(sweep)
    summary = nightly.summarise(out)
    verdicts = nightly.compare(summary, baseline, timing_tolerance) if baseline is not None else []
    if baseline is None:
        print(f"\nnightly {sweep.name!r}: no baseline at {source!r} yet; --promote makes this run the baseline")
    else:
        print(f"\nnightly {sweep.name!r} versus the baseline at {source!r} (commit {baseline.git_commit[:12]}):")
        print(nightly.table(verdicts))
    nightly.record(sweep, out, summary, verdicts, source, promote)
    section = nightly.report_section(verdicts, source) if baseline is not None else None
    report = write_sweep_report(sweep, out, baseline=section)  # the sweep's report again, with "versus baseline"
    if report:
        print(f"report: {report}")
    ok = nightly.passed(verdicts)
    print(f"nightly {'PASSED' if ok else 'REGRESSED'}" + (" and is the new baseline" if ok and promote else ""))
    return 0 if ok else 1


def _ui(output_dir: str | None, tracking_uri: str | None, host: str, port: int) -> int:
    """Start the MLflow UI (an `mlflow server` process) in the foreground; Ctrl+C stops it."""
    from lora_search.layout import default_tracking_uri
    from lora_search.tracking import server_env

    uri = tracking_uri or default_tracking_uri(output_dir or os.environ.get("LORA_SEARCH_OUTPUT_DIR", "reports"))
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        where = uri.removeprefix("sqlite:///")
        raise ConfigError(
            [Problem("tracking store", where, "not found: no sweep has been tracked there", "run a sweep first")]
        )
    if not host.strip():
        raise ConfigError([Problem("--host", host, "is empty", "drop it (127.0.0.1: this machine only)")])
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host]
    # One uvicorn worker (MLflow's default is 4) and no GenAI job runner (`tracking.server_env`): a one-user UI for
    # the sweep's runs needs neither. Measured on a 2-core machine: healthy after 8.2 s and 8 CPU-s, against 16.9 s
    # and 47 CPU-s with MLflow's defaults.
    command += ["--port", str(port), "--workers", "1"]
    env = server_env()
    if host not in LOOPBACK_HOSTS:  # the opt-in: say what it exposes
        print(
            f"warning: --host {host} serves the MLflow UI beyond this machine, without a login: whoever reaches "
            f"port {port} can read, change and delete every run and artifact of {uri}. Keep it behind a firewall "
            "or an authenticating proxy (MLflow still answers only the Host headers of --allowed-hosts: localhost "
            "and private IPs)",
            file=sys.stderr,
            flush=True,
        )
    print(f"MLflow UI for {uri} on http://{host}:{port} (Ctrl+C stops it)", flush=True)
    os.execve(sys.executable, command, env)  # the UI server replaces this process: signals and exit code are its own
    return 0


def _report(name_or_dir: str, output_dir: str | None) -> int:
    """A bare NAME is a sweep under the output dir; anything with a path separator is the sweep dir itself."""
    from lora_search.report import write_report

    if os.sep in name_or_dir or name_or_dir in (".", ".."):
        where = Path(name_or_dir)
    else:
        where = Path(output_dir or os.environ.get("LORA_SEARCH_OUTPUT_DIR", "reports")) / name_or_dir
    print(write_report(where))
    return 0


def _compare(ids: list[str], prompt: str, output_dir: str | None, max_new_tokens: int) -> int:
    """Each named trial's answer to `prompt` beside the base's, from the sweeps under the output dir."""
    from lora_search import answers

    if max_new_tokens < 1:
        raise ConfigError([Problem("--max-new-tokens", max_new_tokens, "must be at least 1", "e.g. 32 (the default)")])
    where = Path(output_dir or os.environ.get("LORA_SEARCH_OUTPUT_DIR", "reports"))
    found = answers.find_adapters(ids, where)  # an unknown id fails here, before any model loads
    print(answers.table(answers.compare(found, prompt, max_new_tokens)))
    return 0


def _guarded(action: Callable[[], int]) -> int:
    from lora_search.sweep import SweepExistsError, SweepInterrupted

    try:
        return action()
    except ConfigError as e:
        print(e, file=sys.stderr)
        return EXIT_INVALID
    except SweepExistsError as e:
        print(e, file=sys.stderr)
        return EXIT_EXISTS
    except SweepInterrupted as e:
        print(e, file=sys.stderr)
        return EXIT_INTERRUPTED


def run_sweep_main(sweep: Sweep, argv: list[str] | None = None, *, config_dir: str | Path | None = None) -> None:
    """`python sweeps/NAME.py [--validate] [--fresh] [--dry-run [--gpus N] [--nodes N] [--gpu H100]]`.

    `config_dir`: a dir with the base's config.json that --dry-run plans from, so that a hub id plans offline.
    """
    parser = argparse.ArgumentParser(description=f"run the {sweep.name!r} sweep")
    parser.add_argument("--validate", action="store_true", help="only check the sweep, start nothing")
    parser.add_argument("--fresh", action="store_true", help="move earlier results of this sweep aside first")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the plan (memory, packing, GPU-hours, cost), start nothing"
    )
    parser.add_argument("--gpus", type=int, default=8, help="--dry-run: GPUs in the cluster (default 8)")
    parser.add_argument("--nodes", type=int, help="--dry-run: nodes they are on (default: full nodes)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="--dry-run: GPUs per node at most (default 8)")
    parser.add_argument("--gpu", default="H100", help="--dry-run: GPU type for time and cost (H100, H200)")
    parser.add_argument("--config-dir", default=config_dir, help="--dry-run: plan from this config.json's dir")
    parser.add_argument(
        "--mfu", type=float, default=0.35, help="--dry-run: the MFU trials reach (a report's 'Plan vs measured')"
    )
    args = parser.parse_args(argv)
    if args.dry_run:  # not through _guarded, which imports Ray: a plan needs neither Ray nor a GPU
        from lora_search.plan import format_plan, plan

        try:
            found = plan(
                sweep,
                cluster_gpus=args.gpus,
                nodes=args.nodes,
                gpus_per_node=args.gpus_per_node,
                config_dir=args.config_dir,
                gpu=args.gpu,
                mfu=args.mfu,
            )
        except ConfigError as e:
            print(e, file=sys.stderr)
            sys.exit(EXIT_INVALID)
        print(format_plan(found))
        sys.exit(0)
    if args.validate:
        sys.exit(_guarded(lambda: _validate(sweep, [])))
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)  # the sweep file, run as a script
    sweep_file = main_file if main_file and main_file.endswith(".py") else None
    sys.exit(_guarded(lambda: _run(sweep, [], args.fresh, sweep_file)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lora-search", description="LoRA hyperparameter sweeps on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    p_validate = sub.add_parser("validate", help="check a sweep file; start nothing")
    p_validate.add_argument("sweep_file")
    p_run = sub.add_parser("run", help="validate and run (or resume) a sweep")
    p_run.add_argument("sweep_file")
    p_run.add_argument("--fresh", action="store_true", help="move earlier results of this sweep aside first")
    p_resume = sub.add_parser("resume", help="resume an unfinished sweep by name (the file it started from is reused)")
    p_resume.add_argument("name", metavar="NAME")
    p_resume.add_argument("--output-dir", help="where NAME ran (default: $LORA_SEARCH_OUTPUT_DIR, else reports)")
    p_eval = sub.add_parser("eval", help="score saved adapters on the sweep's golden sets (one base load)")
    p_eval.add_argument("sweep_file")
    p_eval.add_argument("--adapters", nargs="+", help="adapter dirs (default: every adapter of the sweep)")
    p_eval.add_argument("--output", help="also write the scores as JSON here")
    p_eval.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    from lora_search.serving import EXPORTABLE

    p_export = sub.add_parser("export", help="export an adapter (MLflow run or dir), optionally merged, base checked")
    p_export.add_argument("source", metavar="RUN_ID_OR_ADAPTER_DIR")
    p_export.add_argument("--merge", action="store_true", help="merge into the base; write one plain model")
    p_export.add_argument("--output", help="default: ./exported/<run id or dir name>[-merged]")
    p_export.add_argument("--base", help="base dir or hub id (default: the one the adapter was trained on)")
    p_export.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else the sweep's)")
    p_export.add_argument("--no-check", action="store_true", help="skip the base fingerprint check")
    p_export.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    p_export.add_argument(
        "--for",
        dest="engine",
        choices=EXPORTABLE,
        help="write what this serving engine loads: the adapter where it can, else the merged model (and why); "
        "reloaded and checked against the trial's probe logits",
    )
    p_export.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="load the base (and write a merged model) in this dtype (default: the checkpoint's own); float32 keeps "
        "a merge's rounding out of the weights",
    )
    p_export.add_argument(
        "--allow-drift",
        action="store_true",
        help="with --for: keep an export whose reloaded logits differ from the trial's by more than 2%% of their "
        "scale (recorded in the export record)",
    )
    from lora_search.nightly import TIMING_TOLERANCE

    p_nightly = sub.add_parser("nightly", help="run a pinned sweep and compare it with a baseline (exit 1: regressed)")
    p_nightly.add_argument("sweep_file")
    p_nightly.add_argument("--baseline", required=True, help="'mlflow' (the last promoted nightly) or a JSON file")
    p_nightly.add_argument("--promote", action="store_true", help="a passing run becomes the baseline")
    p_nightly.add_argument(
        "--timing-tolerance",
        default=str(TIMING_TOLERANCE),
        help=f"how much worse cost per trial and tokens/s may get (default {TIMING_TOLERANCE}: 30%%); more on a "
        "shared runner whose neighbours slow a run",
    )
    p_ui = sub.add_parser("ui", help="start the MLflow UI for the sweeps' tracking store")
    p_ui.add_argument("--output-dir", help="where the sweeps ran (default: $LORA_SEARCH_OUTPUT_DIR, else reports)")
    p_ui.add_argument("--tracking-uri", help="another store, e.g. a PostgreSQL URI (default: the embedded one)")
    p_ui.add_argument(
        "--host",
        default="127.0.0.1",
        help="default 127.0.0.1: this machine only; 0.0.0.0 (opt-in) serves every network, with no login",
    )
    p_ui.add_argument("--port", type=int, default=5000)
    p_plan = sub.add_parser("plan", help="a sweep's trials, memory per GPU, packing, GPU-hours and cost; start nothing")
    p_plan.add_argument("sweep_file")
    p_plan.add_argument("--gpus", type=int, default=8, help="GPUs in the cluster (default 8)")
    p_plan.add_argument("--nodes", type=int, help="nodes they are on (default: full nodes of --gpus-per-node)")
    p_plan.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node at most (default 8)")
    p_plan.add_argument("--gpu", default="H100", help="GPU type for time and cost (H100, H200)")
    p_plan.add_argument(
        "--config-dir",
        help="plan from this config.json's dir (default: configs/<model> beside the sweep file, else the base itself)",
    )
    p_plan.add_argument(
        "--mfu", type=float, default=0.35, help="the MFU trials reach (default 0.35; a report's 'Plan vs measured')"
    )
    p_report = sub.add_parser("report", help="write a finished sweep's results as one self-contained HTML page")
    p_report.add_argument("sweep", metavar="NAME_OR_DIR", help="a sweep name under the output dir, or a sweep dir")
    p_report.add_argument("--output-dir", help="where NAME ran (default: $LORA_SEARCH_OUTPUT_DIR, else reports)")
    p_compare = sub.add_parser("compare", help="generate from several trials' adapters on one base load (greedy)")
    p_compare.add_argument("ids", nargs="+", metavar="TRIAL_OR_RUN_ID", help="trial ids or their MLflow run ids")
    p_compare.add_argument("--prompt", required=True, help="the text to continue, as is (no chat template added)")
    p_compare.add_argument("--max-new-tokens", type=int, default=32, help="default 32")
    p_compare.add_argument("--output-dir", help="where the sweeps ran (default: $LORA_SEARCH_OUTPUT_DIR, else reports)")
    args = parser.parse_args(argv)

    def load_and(action: Callable[[Sweep, list[Problem]], int]) -> Callable[[], int]:
        def go() -> int:
            sweep, problems = load_sweep(args.sweep_file)
            return action(sweep, problems)

        return go

    if args.command == "validate":
        sys.exit(_guarded(load_and(_validate)))
    if args.command == "eval":
        sys.exit(_guarded(load_and(lambda s, p: _eval(s, p, args.adapters, args.output, args.allow_pickle))))
    if args.command == "run":
        sys.exit(_guarded(load_and(lambda s, p: _run(s, p, args.fresh, args.sweep_file))))
    if args.command == "resume":
        sys.exit(_guarded(lambda: _resume(args.name, args.output_dir)))
    if args.command == "export":
        export = lambda: _export(
            args.source,
            args.merge,
            args.output,
            args.base,
            args.tracking_uri,
            not args.no_check,
            args.allow_pickle,
            args.engine,
            args.dtype,
            args.allow_drift,
        )
        sys.exit(_guarded(export))
    if args.command == "nightly":
        sys.exit(_guarded(load_and(lambda s, p: _nightly(s, p, args.baseline, args.promote, args.timing_tolerance))))
    if args.command == "ui":
        sys.exit(_guarded(lambda: _ui(args.output_dir, args.tracking_uri, args.host, args.port)))
    if args.command == "plan":  # the sweep file's --dry-run, with its shipped architecture found by name
        try:
            sweep, problems = load_sweep(args.sweep_file)
        except ConfigError as e:
            print(e, file=sys.stderr)
            sys.exit(EXIT_INVALID)
        if problems:
            print(ConfigError(problems, header=f"invalid sweep {sweep.name!r}"), file=sys.stderr)
            sys.exit(EXIT_INVALID)
        from lora_search.plan import shipped_config_dir

        flags = ["--gpus", str(args.gpus), "--gpus-per-node", str(args.gpus_per_node), "--gpu", args.gpu]
        flags += ["--mfu", str(args.mfu)]
        flags += ["--nodes", str(args.nodes)] if args.nodes is not None else []
        config_dir = args.config_dir or shipped_config_dir(args.sweep_file, sweep.base)
        run_sweep_main(sweep, ["--dry-run", *flags], config_dir=config_dir)
    if args.command == "report":
        sys.exit(_guarded(lambda: _report(args.sweep, args.output_dir)))
    if args.command == "compare":
        sys.exit(_guarded(lambda: _compare(args.ids, args.prompt, args.output_dir, args.max_new_tokens)))


if __name__ == "__main__":
    main()
