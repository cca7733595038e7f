"""The `clinft` command.

    clinft run study.yaml [--out DIR] [--set key=value ...]   run a study (local GPUs, CPU, or a Ray cluster)
    clinft demo [--out DIR] [--tasks all] [--set key=value ...]   the built-in demo, no downloads, CPU is fine
    clinft validate study.yaml [--set key=value ...]          check the config and every split, load no model
    clinft report OUTPUT_DIR [--set stats.alpha=0.01 ...]      redo a finished study's statistics, costs and
                                                              reports (stats.*, cost.*), no training

Exit codes: 0 done, 2 bad config, data or resources (one line per problem, no row text), 1 anything else.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from clinft_ray.config import ConfigError, load_study
from clinft_ray.data import DataError
from clinft_ray.sweep import StudyError

log = logging.getLogger("clinft")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clinft", description="SFT then DPO on clinical tasks, with statistics.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("run", "run a study"), ("validate", "check a study's config and data")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("config", help="study YAML")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
        if name == "run":
            p.add_argument("--out", help="output directory (overrides output_dir)")
    p = sub.add_parser("demo", help="run the built-in demo study on a tiny local model")
    p.add_argument("--out", default="clinft-demo", help="output directory (default: ./clinft-demo)")
    p.add_argument("--tasks", default="classification",
                   help="classification (default, ~3 min on 2 CPUs), all, or a comma list of task kinds")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p = sub.add_parser("report", help="rebuild a finished study's statistics, reports and figures (no training)")
    p.add_argument("output_dir", help="the output directory of a finished study")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a stats.* or cost.* setting, e.g. stats.alpha=0.01 or cost.gpu_hour_usd=3.1")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="clinft: %(message)s", stream=sys.stderr)
    logging.getLogger("clinft").setLevel(logging.INFO)
    from clinft_ray.sweep import quiet_libraries

    quiet_libraries()
    try:
        if args.command == "validate":
            return validate(args.config, args.set)
        if args.command == "demo":
            return demo(args.out, args.tasks, args.set)
        if args.command == "report":
            return report(args.output_dir, args.set)
        else:
            config, out = args.config, args.out
        return run(config, args.set, out)
    except (ConfigError, DataError) as err:
        for line in str(err).splitlines():
            print(f"clinft: error: {line}", file=sys.stderr)
        return 2
    except StudyError as err:
        print(f"clinft: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("clinft: interrupted", file=sys.stderr)
        return 130


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


def validate(config: str, overrides: list[str]) -> int:
    from clinft_ray.study import check_data

    study = load_study(config, overrides)
    data = check_data(study)
    for name, splits in data.items():
        print(f"{name}: " + ", ".join(f"{s} {len(rows)} rows" for s, rows in splits.items()))
    print(f"{config}: OK ({study.sft_space.num_trials()} SFT + {study.dpo_space.num_trials()} DPO trials per task)")
    return 0


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


def run(config: str | Path, overrides: list[str], out: str | None) -> int:
    from clinft_ray.report import results_table
    from clinft_ray.study import PreflightError, mlflow_ui_command, run_study

    study = load_study(config, overrides, output_dir=out)
    try:
        results = run_study(study)
    except PreflightError as err:
        print(f"clinft: error: {err}", file=sys.stderr)
        return 2
    out_dir = study.config.output_dir
    print()
    print(results_table(results))
    print()
    print(f"results: {out_dir / 'results.json'}")
    print(f"report:  {out_dir / 'report.md'}")
    print(f"per-example outcomes: {out_dir / 'outcomes.jsonl'}")
    print(f"MLflow:  {mlflow_ui_command(results, out_dir)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
