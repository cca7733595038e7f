"""The `clinft` command.

    clinft run study.yaml [--out DIR] [--set key=value ...]   run a study (local GPUs, CPU, or a Ray cluster)
    clinft demo [--out DIR] [--tasks all] [--set key=value ...]   the built-in demo, no downloads, CPU is fine
    clinft validate study.yaml [--set key=value ...] [--out DIR] [--check-services]
                                  everything `run` checks before training, load no model
    clinft report OUTPUT_DIR [--set stats.alpha=0.01 ...]      redo a finished study's statistics, costs and
                                                              reports (stats.*, cost.*), no training
    clinft plan study.yaml [--calibrate | --tokens-per-second N] [--gpu-memory-gb GB]
                                  counts, tokens, hours, cost and one trial's memory, before anything runs
    clinft export OUTPUT_DIR --stage sft|dpo [--task T] --to DIR [--format merged|adapter] [--dtype D]
    clinft export models:/<study>-<task>@dpo --to DIR [...]   a selected model as a folder a server loads,
                                                              checked against the model that was scored

Every command takes `--debug`. Exit codes: 0 done, 2 bad config, data, locations or resources (one line
per problem, no row text), 130 Ctrl-C, 143 SIGTERM (both: runs KILLED, state saved, the same command goes
on), 1 anything else: an unexpected error is one `clinft: error:` line with its
type and where it happened, and its traceback goes to a local log file (never to MLflow), or to the
console with `--debug`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from clinft_ray.config import Study, load_study
from clinft_ray.errors import ConfigError, DataError, PreflightError, StudyError

log = logging.getLogger("clinft")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clinft", description="SFT then DPO on clinical tasks, with statistics.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    parser.add_argument("--version", action="version", version=f"clinft-ray {package_version()}")
    common = argparse.ArgumentParser(add_help=False)  # SUPPRESS: `clinft --debug run` and `clinft run --debug`
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    loud = common.add_mutually_exclusive_group()
    loud.add_argument("--verbose", action="store_const", const="verbose", dest="console", default=argparse.SUPPRESS,
                      help="also print Ray Tune's status tables")
    loud.add_argument("--quiet", action="store_const", const="quiet", dest="console", default=argparse.SUPPRESS,
                      help="print the results, warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("run", "run a study"), ("validate", "check a study's config, data, outputs and services")):
        p = sub.add_parser(name, help=help_, parents=[common])
        p.add_argument("config", help="study YAML")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
        p.add_argument("--out", help="output directory (overrides output_dir)")
        if name == "validate":
            p.add_argument("--check-services", action="store_true",
                           help="also check that the tracking server and the judge answer (network calls)")
    p = sub.add_parser("demo", help="run the built-in demo study on a tiny local model", parents=[common])
    p.add_argument("--out", default="clinft-demo", help="output directory (default: ./clinft-demo)")
    p.add_argument("--tasks", default="classification",
                   help="classification (default, ~3 min on 2 CPUs), all, or a comma list of task kinds")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p = sub.add_parser("report", help="rebuild a finished study's statistics, reports and figures (no training)",
                       parents=[common])
    p.add_argument("output_dir", help="the output directory of a finished study")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a stats.* or cost.* setting, e.g. stats.alpha=0.01 or cost.gpu_hour_usd=3.1")
    p = sub.add_parser("plan", help="what a study will cost and whether a trial fits its GPU, before it runs",
                       parents=[common])
    p.add_argument("config", help="study YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--calibrate", action="store_true",
                     help="measure throughput with a few real training steps on this machine's device")
    how.add_argument("--tokens-per-second", type=float, metavar="N",
                     help="training tokens per second of one trial on your GPU (your own figure)")
    p.add_argument("--gpu-memory-gb", type=float, metavar="GB",
                   help="memory of one GPU of the cluster in GiB, e.g. 80 for an A100 80GB (default: this machine's GPU)")
    p = sub.add_parser("export", help="write a study's selected model as a model folder a server loads",
                       parents=[common])
    p.add_argument("source", help="a finished study's output folder, or a registered model: models:/NAME@ALIAS")
    p.add_argument("--to", required=True, help="a new folder to write")
    p.add_argument("--task", help="the task (needed when the study has several)")
    p.add_argument("--stage", choices=("sft", "dpo"), help="which selected model (a registered one knows its own)")
    p.add_argument("--format", choices=("merged", "adapter"), default="merged",
                   help="merged: one plain model folder (default); adapter: one PEFT adapter on the base (LoRA)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="merged weights' dtype (default: float32 for LoRA, as trained for full weights)")
    p.add_argument("--tracking-uri", help="for models:/...: the MLflow server (default: $MLFLOW_TRACKING_URI)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    # Read when ray.tune is first imported, before `study.ray_environment` runs (see there).
    os.environ.setdefault("TUNE_WARN_THRESHOLD_S", "10")
    if getattr(args, "console", None):
        os.environ["CLINFT_CONSOLE"] = args.console  # read by the sweep (`console.level`)
    console_logging(os.environ.get("CLINFT_CONSOLE", "normal"))
    if args.command in ("run", "demo"):
        stop_on_signals()
    try:
        from clinft_ray.trial import quiet_libraries

        quiet_libraries()
        if args.command == "validate":
            return validate(args.config, args.set, args.out, args.check_services)
        if args.command == "demo":
            return demo(args.out, args.tasks, args.set)
        if args.command == "report":
            return report(args.output_dir, args.set)
        if args.command == "export":
            return export(args)
        if args.command == "plan":
            return plan(args)
        return run(args.config, args.set, args.out)
    except (ConfigError, DataError, PreflightError) as err:
        for line in str(err).splitlines():
            print(f"clinft: error: {line}", file=sys.stderr)
        return 2
    except StudyError as err:
        print(f"clinft: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if TERMINATED.is_set():
            print("clinft: stopped by SIGTERM; the study's runs are marked KILLED and its state is saved: run "
                  "the same command (or resubmit the same job) to go on where it stopped", file=sys.stderr)
            return 143
        print("clinft: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 (the one place that turns any other error into one line)
        if args.debug:
            traceback.print_exc()
            return 1
        print(f"clinft: error: unexpected {type(exc).__name__} in {where(exc)}; the traceback is in "
              f"{crash_log(exc)} (or rerun with --debug to see it here)", file=sys.stderr)
        return 1


TERMINATED = threading.Event()  # set by SIGTERM (`stop_on_signals`)


def stop_on_signals() -> None:
    """`run` and `demo` stop on SIGTERM (a preempted node, `ray job stop`, `kubectl delete`, systemd) as
    on Ctrl-C: Ray Tune ends a running sweep and saves its state to storage (`sweep.request_stop`),
    the study marks its runs KILLED, and the exit code says which (143, 130). Python's default for
    SIGTERM is to die at once, leaving the study's MLflow runs RUNNING and the last seconds of Tune's
    record unsaved. A second signal of the same kind stops at once. Only the main thread can set
    handlers; elsewhere the defaults stay."""
    from clinft_ray.sweep import STOP, request_stop

    STOP.clear()  # a stop of an earlier command in this process (`main` called in-process) is not this one's
    TERMINATED.clear()

    def stop(signum: int, frame: object) -> None:
        if signum == signal.SIGTERM:
            TERMINATED.set()
        signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler)
        if not request_stop():
            raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("clinft-ray")
    except PackageNotFoundError:
        return "(not installed)"


class ConsoleFormat(logging.Formatter):
    """clinft's own lines as `clinft: ...`; another library's under its own name and level, so that
    nothing of theirs reads as clinft's."""

    def format(self, record: logging.LogRecord) -> str:
        if record.name == "clinft" or record.name.startswith("clinft."):
            return f"clinft: {record.getMessage()}"
        return f"{record.name}: {record.levelname.lower()}: {record.getMessage()}"


class RetriesOnce(logging.Filter):
    """The first of a library's retry warnings, not the rest: an unreachable model hub is retried five
    times, two warnings each, before the error that says what to fix."""

    MARKS = ("Retrying in ", " thrown while requesting ")

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        marks = [mark for mark in self.MARKS if mark in record.getMessage()]
        if not marks:
            return True
        key = f"{record.name} {marks[0]}"  # the first failure and the first retry notice
        first = key not in self.seen
        self.seen.add(key)
        return first


def not_ray_token_notice(record: logging.LogRecord) -> bool:
    """False for Ray's notice that it enabled token authentication for a local cluster, which it gives
    at every start and which asks nothing of the user (its warning when authentication is off passes).
    Setting RAY_AUTH_MODE instead comes too late: Ray reads it when it is imported. One function, so
    that `console_logging` called again adds no second filter."""
    return not record.getMessage().startswith("Token authentication is enabled")


def console_logging(level: str) -> None:
    """clinft's lines on stderr (warnings and errors only with --quiet), other libraries' warnings
    under their names, once each (the Hugging Face hub's own handler removed, so its lines come
    through this one alone; its retries once), and neither MLflow's routine INFO lines nor Ray's
    notice that it enabled token authentication."""
    import huggingface_hub.utils.logging as hf_logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ConsoleFormat())
    handler.addFilter(RetriesOnce())
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    hub = hf_logging.get_logger()
    for own in list(hub.handlers):
        hub.removeHandler(own)
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(not_ray_token_notice)
    logging.getLogger("clinft").setLevel(logging.WARNING if level == "quiet" else logging.INFO)
    logging.getLogger("mlflow").setLevel(logging.WARNING)


def where(exc: BaseException) -> str:
    """`module:function` of the innermost clinft_ray frame of the traceback, and of the innermost frame
    if that is elsewhere (a library)."""
    frames = [(f.f_globals.get("__name__", "?"), f.f_code.co_name) for f, _ in traceback.walk_tb(exc.__traceback__)]
    if not frames:
        return "clinft"
    ours = [fr for fr in frames if fr[0].startswith("clinft_ray")]
    inner = f"{frames[-1][0]}:{frames[-1][1]}"
    if not ours or ours[-1] == frames[-1]:
        return inner
    return f"{ours[-1][0]}:{ours[-1][1]} (raised in {inner})"


def crash_log(exc: BaseException) -> Path:
    """Write the traceback to a new file on local disk, readable by this user only: an exception's
    message may quote data, so it goes here, never to the console or MLflow. The folder is
    $CLINFT_LOG_DIR, else $CLINFT_CACHE/logs, else ~/.cache/clinft/logs."""
    cache = Path(os.environ.get("CLINFT_CACHE") or Path.home() / ".cache" / "clinft")
    folder = Path(os.environ.get("CLINFT_LOG_DIR") or cache / "logs")
    text = f"clinft {' '.join(sys.argv[1:])}\n" + "".join(traceback.format_exception(exc))
    name = f"error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for place in (folder, Path("/tmp") / f"clinft-logs-{os.getuid()}"):
        try:
            place.mkdir(parents=True, exist_ok=True, mode=0o700)
            path = place / name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as f:
                f.write(text)
            return path
        except OSError:
            continue
    return Path("(no log: no writable log folder; set CLINFT_LOG_DIR)")


def demo(out: str, tasks: str, overrides: list[str]) -> int:
    """Prepare the demo folder and run it; a rule-based judge serves on 127.0.0.1 when needed."""
    from clinft_ray.demo import judge_server, needs_judge, prepare_demo

    config = prepare_demo(out, tasks)
    if not needs_judge(config):
        return run(config, overrides, None)
    server, url = judge_server.start()
    log.info("demo judge (rule-based, word overlap) on %s", url)
    try:
        return run(config, [f"judge.base_url={url}", *overrides], None)
    finally:
        server.shutdown()


def validate(config: str, overrides: list[str], out: str | None, check_services: bool) -> int:
    """What `clinft run` checks before training, without loading a model or starting Ray: the config,
    every split, the output and storage locations, a finished study in the output folder, the trial's
    resources on this machine, and (with `--check-services`) the tracking server and the judge."""
    from clinft_ray.preflight import precision_warning
    from clinft_ray.study import check_data

    study = load_study(config, overrides, output_dir=out)
    data = check_data(study)
    for name, splits in data.items():
        print(f"{name}: " + ", ".join(f"{s} {len(rows)} rows" for s, rows in splits.items()))
    problems, notes = preflight_problems(study, check_services)
    if problems:
        raise PreflightError("\n".join(problems))
    for note in notes:
        print(note)
    if warning := precision_warning(study):
        print(f"warning: {warning}")
    print(f"{config}: OK ({study.sft_space.num_trials()} SFT + {study.dpo_space.num_trials()} DPO trials per task)")
    return 0


def preflight_problems(study: Study, check_services: bool) -> tuple[list[str], list[str]]:
    """(problems, notes) of the checks `run_study` makes before Ray starts, each caught separately so
    all are reported together; the notes say what was not tried."""
    from clinft_ray.preflight import check_judge, check_locations, check_tracking, trial_resources, uses_judge
    from clinft_ray.study import finished, study_fingerprint
    from clinft_ray.tracking import redact_uri, study_tracking_uri

    cfg = study.config
    uri = study_tracking_uri(cfg.mlflow.tracking_uri, cfg.output_dir)
    notes = []

    def done_before() -> None:
        if finished(study, study_fingerprint(study)) is not None:
            notes.append(f"{cfg.output_dir}: this study already finished there; clinft run would train nothing "
                         "and print its results again")

    checks = [lambda: check_locations(cfg), done_before]
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        notes.append("resources: not checked against the cluster (clinft run asks it before any trial starts)")
    else:
        checks.append(lambda: trial_resources(cfg.resources, _this_machine(cfg.ray.num_cpus)))
    remote = {"mlflow.tracking_uri": redact_uri(uri)} if uri.startswith(("http://", "https://")) else {}
    if uses_judge(cfg):
        remote["judge.base_url"] = redact_uri(cfg.judge.base_url)
    if check_services:
        checks += [lambda: check_tracking(uri)] + ([lambda: check_judge(cfg.judge)] if uses_judge(cfg) else [])
    else:
        notes += [f"{k} {v}: not checked; pass --check-services to check that it answers" for k, v in remote.items()]
    problems = []
    for check in checks:
        try:
            check()
        except PreflightError as err:
            problems += str(err).splitlines()
    return problems, notes


def _this_machine(num_cpus: int | None) -> dict[str, float]:
    """What a local Ray would see here: the CPUs (or ray.num_cpus) and the CUDA GPUs."""
    import torch

    return {"CPU": float(num_cpus or os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def report(output_dir: str, overrides: list[str]) -> int:
    """Rebuild results.json's statistics and costs, the reports and figures of a finished study from
    its stored outcomes and device-hours, and update its MLflow runs; loads no model, starts no Ray."""
    from clinft_ray.outputs import rebuild
    from clinft_ray.report import results_table

    results = rebuild(output_dir, overrides)
    out = Path(output_dir).resolve()
    print(results_table(results))
    print()
    print(results["multiple_comparisons"]["footnote"])
    print(f"results: {out / 'results.json'}")
    print(f"report:  {out / 'report.md'}")
    return 0


def plan(args: argparse.Namespace) -> int:
    """`clinft plan`: counts, tokens, time, cost and per-trial memory of a study, before it runs; exit 2
    when a trial would not fit the GPU."""
    from clinft_ray.plan import plan_study

    for name in ("tokens_per_second", "gpu_memory_gb"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise PreflightError(f"--{name.replace('_', '-')} {value:g}: give a positive number")
    study = load_study(args.config, args.set)
    _, lines, problem = plan_study(study, calibrate_here=args.calibrate, tokens_per_second=args.tokens_per_second,
                                   gpu_memory_gb=args.gpu_memory_gb)
    print("\n".join(lines))
    if problem:
        raise PreflightError(problem)
    return 0


def export(args: argparse.Namespace) -> int:
    """`clinft export`: the selected model of a study folder or of a registered version, written and checked."""
    import tempfile

    from clinft_ray.export import difference, from_registry, from_study
    from clinft_ray.export import export as write

    with tempfile.TemporaryDirectory() as scratch:
        if args.source.startswith("models:/"):
            uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
            if not uri:
                raise PreflightError(f"{args.source}: which MLflow? pass --tracking-uri or set MLFLOW_TRACKING_URI "
                                 "(a local study's is sqlite:///OUTPUT_DIR/mlflow.db)")
            selected = from_registry(args.source, uri, Path(scratch))
            if args.stage and args.stage != selected.stage:
                raise PreflightError(f"{args.source} is the {selected.stage} model, not {args.stage}; drop --stage")
        else:
            if not args.stage:
                raise PreflightError("--stage: say which selected model to export, sft or dpo")
            selected = from_study(args.source, args.task, args.stage)
        log.info("exporting %s / %s %s (%s, %s)", selected.study, selected.task, selected.stage.upper(),
                 selected.model.finetune, args.format)
        dest = write(selected, args.to, args.format, args.dtype).resolve()
    check = json.loads((dest / "clinft_export.json").read_text())["check"]
    print(f"{dest}: the {selected.stage.upper()} model of {selected.study} / {selected.task} as {args.format}")
    print(f"checked: logits within {difference(check)} of the scored model's, on a {check['probe_tokens']}-token "
          "probe")
    print(f"model card: {dest / 'MODEL_CARD.md'}")
    if args.format == "adapter":
        print(f"serve: vllm serve {selected.model.name_or_path} --enable-lora --lora-modules "
              f"{selected.task}-{selected.stage}={dest}")
    else:
        print(f"serve: vllm serve {dest}   (or AutoModelForCausalLM.from_pretrained('{dest}'))")
    return 0


def run(config: str | Path, overrides: list[str], out: str | None) -> int:
    from clinft_ray.report import results_table
    from clinft_ray.study import mlflow_ui_command, run_study

    study = load_study(config, overrides, output_dir=out)
    results = run_study(study)
    out_dir = study.config.output_dir
    print()
    print(results_table(results))
    print()
    print(f"results: {out_dir / 'results.json'}")
    print(f"report:  {out_dir / 'report.md'}")
    print(f"per-example outcomes: {out_dir / 'outcomes.jsonl'}")
    print(f"MLflow:  {mlflow_ui_command(results, out_dir)}")
    if study.config.mlflow.register_models:
        task = next(iter(results["tasks"]))
        print(f"models:  models:/{study.config.study}-{task}@sft and @dpo; as a folder to serve: clinft export "
              f"{out_dir} --stage dpo{'' if len(results['tasks']) == 1 else f' --task {task}'} --to DIR")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
