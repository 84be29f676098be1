"""`raylm <command> CONFIG [--set a.b=c ...] [--tracking-uri URI] [--verbose]`.

`raylm config STAGE [CONFIG] [--set ...]` prints a stage's resolved config, every key with its
default and a one-line description (docs/config.md has them all).

Exit status: 0 done, 1 the stage failed, 2 the configuration is invalid (nothing was started),
3 the command is not built yet.

The console shows raylm's own lines: a header per stage, progress, results. What Ray, Ray Train
and vLLM print goes to the stage's ``<output_dir>/logs/ray.log`` (logged to its MLflow run);
``--verbose`` shows it all as Ray prints it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from raylm.config import ConfigError, load_config
from raylm.stages import COMMANDS, StageNotBuilt, stage_module
from raylm.tracking import stage_run

HELP = {
    "data": "raw text -> deduplicated, filtered, tokenized training shards (Ray Data)",
    "pretrain": "pretrain a dense or MoE model on token shards (Ray Train)",
    "sft": "instruction-tune a checkpoint, prompt masked out of the loss",
    "reward": "train a reward model on pairwise preferences",
    "rlhf": "PPO with policy, vLLM rollout, reward and reference actor pools",
    "dpo": "direct preference optimisation against a frozen reference",
    "eval": "perplexity, few-shot benchmarks, preference win rates",
    "export": "build or load a model, export it in Hugging Face format, check it in transformers and vLLM",
    "serve": "serve a checkpoint (and LoRA adapters) on an OpenAI-compatible endpoint (vLLM's server in a Ray actor)",
    "run": "the whole lifecycle as one MLflow parent run",
    "submit": "submit a config to a Ray cluster as a Ray job",
}
CONFIG_HELP = "print a stage's resolved config: every key, its value and what it is"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raylm", description="A language model's whole life on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command, help=HELP[command], description=HELP[command],
                           epilog=f"Every key of the config: `raylm config {command}` or docs/config.md.")
        p.add_argument("config", nargs="?" if command == "submit" else None,
                       help="YAML config file" + (" (not for --status, --logs, --stop)" if command == "submit" else "")
                       + (", or a checkpoint folder" if command == "serve" else ""))
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set model.dim=256 (repeatable)")
        p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: SQLite in output_dir)")
        p.add_argument("--verbose", action="store_true",
                       help="print Ray's, Ray Train's and vLLM's output too (default: to <output_dir>/logs/ray.log)")
        if command == "submit":
            p.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://127.0.0.1:8265")
            p.add_argument("--no-follow", dest="follow", action="store_false",
                           help="submit and return; do not print the job's log until it ends")
            job = p.add_mutually_exclusive_group()
            job.add_argument("--status", metavar="JOB_ID", help="print a submitted job's status")
            job.add_argument("--logs", metavar="JOB_ID", help="print a submitted job's log")
            job.add_argument("--stop", metavar="JOB_ID", help="stop a submitted job")
    p = sub.add_parser("config", help=CONFIG_HELP, description=CONFIG_HELP)
    p.add_argument("stage", choices=list(COMMANDS), help="the command whose config to print")
    p.add_argument("config", nargs="?", default=None, help="YAML config file (default: the defaults alone)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    return parser


def print_config(args) -> int:
    from raylm.config_reference import commented_yaml, config_class

    try:
        module = stage_module(args.stage)
    except StageNotBuilt as e:
        print(f"raylm: {e}", file=sys.stderr)
        return 3
    try:
        if args.stage == "submit":
            config = load_config(module.Config, args.config, args.overrides).submit
            print("submit:")
            print("  " + commented_yaml(config).rstrip().replace("\n", "\n  "))
            return 0
        config = load_config(config_class(args.stage), args.config, args.overrides, ignore=("submit",))
        stages = [module.stage_config(config, stage, args.config) for stage in config.stages] \
            if args.stage == "run" else []
    except ConfigError as e:
        print(f"raylm: invalid config\n{e}", file=sys.stderr)
        return 2
    sys.stdout.write(commented_yaml(config))
    for stage, (_, stage_cfg) in zip(getattr(config, "stages", []), stages):
        # what each stage of the lifecycle will run with: its file, the inherited keys, its section
        sys.stdout.write(f"---\n# stage {stage}, resolved\n" + commented_yaml(stage_cfg))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "config":
        return print_config(args)
    from raylm import console

    console.set_verbose(args.verbose)
    console.capture_native_stderr()  # before Ray starts: its C++ core writes to fd 2 itself
    try:
        module = stage_module(args.command)
    except StageNotBuilt as e:
        print(f"raylm: {e}", file=sys.stderr)
        return 3
    if args.command == "submit" and (args.status or args.logs or args.stop):
        return module.job_command(args)  # a job id is all it needs
    if args.config is None:
        print(f"raylm {args.command}: a config file is required (or --status / --logs / --stop JOB_ID)",
              file=sys.stderr)
        return 2
    config_file = args.config
    if args.command == "serve" and Path(args.config).is_dir():  # `raylm serve CHECKPOINT`: no file needed
        args.overrides, config_file = [f"checkpoint={args.config}", *args.overrides], None
    try:
        config = load_config(module.Config, config_file, args.overrides,
                             ignore=() if args.command == "submit" else ("submit",))
        if hasattr(module, "check"):  # checks that need more than one section (e.g. files exist)
            module.check(config, config_file)
    except ConfigError as e:
        print(f"raylm: invalid config\n{e}", file=sys.stderr)
        return 2
    if args.command == "submit":
        return int(module.submit(config, args) or 0)
    from raylm.tracking import stage_log_path

    log = stage_log_path(config)  # a lifecycle's stages each write their own, under <output_dir>/<stage>
    print(f"=== raylm {args.command} ({args.config}) ===", flush=True)
    if not args.verbose:
        console.CONSOLE.log_to(log)
        print(f"raylm {args.command}: Ray, Ray Train and vLLM output goes to "
              f"{log if args.command != 'run' else log.parent.parent / '<stage>' / 'logs' / log.name} "
              "(--verbose to see it here)", flush=True)
    try:
        if args.command == "run":
            summary = module.run(config, tracking_uri=args.tracking_uri)
        else:
            if hasattr(module, "WORKER_MODULES"):  # a stage whose actors wait on these imports: Ray first, so
                from raylm.ray_init import init_ray  # that its workers import them while MLflow sets up

                init_ray(config.ray, module.WORKER_MODULES)
            with stage_run(args.command, config, uri=args.tracking_uri) as run:
                print(f"raylm {args.command}: MLflow run {run.run_id} at {run.uri}", flush=True)
                summary = module.run(config, run)
    except StageNotBuilt as e:
        print(f"raylm: {e}", file=sys.stderr)
        return 3
    print(json.dumps({"command": args.command, **(summary or {})}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
