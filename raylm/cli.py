"""`raylm <command> CONFIG [--set a.b=c ...] [--tracking-uri URI] [--verbose]`.

`raylm config STAGE [CONFIG] [--set ...]` prints a stage's resolved config, every key with its
default and a one-line description (docs/config.md has them all).

Exit status: 0 done, 1 the stage failed, 2 the configuration is invalid (nothing was started).

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
from raylm.stages import COMMANDS, run_stage

CONFIG_HELP = "print a stage's resolved config: every key, its value and what it is"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raylm", description="A language model's whole life on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command, stage in COMMANDS.items():
        p = sub.add_parser(command, help=stage.help, description=stage.help,
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

    module = COMMANDS[args.stage].module
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
    stage = COMMANDS[args.command]
    module = stage.module
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
        config = load_config(stage.config_class, config_file, args.overrides,
                             ignore=() if args.command == "submit" else ("submit",))
        stage.check(config, config_file)
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
    if stage.tracked:
        summary, _ = run_stage(stage, config, tracking_uri=args.tracking_uri)
    else:  # `raylm run`: a parent MLflow run, and each stage's nested in it
        summary = module.run(config, tracking_uri=args.tracking_uri)
    print(json.dumps({"command": args.command, **(summary or {})}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
