"""`raylm <command> CONFIG [--set a.b=c ...] [--tracking-uri URI]`.

Exit status: 0 done, 1 the stage failed, 2 the configuration is invalid (nothing was started),
3 the command is not built yet.
"""

from __future__ import annotations

import argparse
import json
import sys

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
    "run": "the whole lifecycle as one MLflow parent run",
    "submit": "submit a config to a Ray cluster as a Ray job",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raylm", description="A language model's whole life on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command, help=HELP[command], description=HELP[command])
        p.add_argument("config", help="YAML config file")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set model.dim=256 (repeatable)")
        p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: SQLite in output_dir)")
        if command == "submit":
            p.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://127.0.0.1:8265")
            p.add_argument("--no-follow", dest="follow", action="store_false",
                           help="submit and return; do not print the job's log until it ends")
            job = p.add_mutually_exclusive_group()
            job.add_argument("--status", metavar="JOB_ID", help="print a submitted job's status")
            job.add_argument("--logs", metavar="JOB_ID", help="print a submitted job's log")
            job.add_argument("--stop", metavar="JOB_ID", help="stop a submitted job")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        module = stage_module(args.command)
    except StageNotBuilt as e:
        print(f"raylm: {e}", file=sys.stderr)
        return 3
    try:
        config = load_config(module.Config, args.config, args.overrides,
                             ignore=() if args.command == "submit" else ("submit",))
        if hasattr(module, "check"):  # checks that need more than one section (e.g. files exist)
            module.check(config, args.config)
    except ConfigError as e:
        print(f"raylm: invalid config\n{e}", file=sys.stderr)
        return 2
    if args.command == "submit":
        return int(module.submit(config, args) or 0)
    if args.command == "run":
        try:
            summary = module.run(config, tracking_uri=args.tracking_uri)
        except StageNotBuilt as e:
            print(f"raylm: {e}", file=sys.stderr)
            return 3
    else:
        if hasattr(module, "WORKER_MODULES"):  # a stage whose actors wait on these imports: Ray first, so that its
            from raylm.ray_init import init_ray  # workers import them while MLflow sets up

            init_ray(config.ray, module.WORKER_MODULES)
        with stage_run(args.command, config, uri=args.tracking_uri) as run:
            print(f"raylm {args.command}: MLflow run {run.run_id} at {run.uri}", flush=True)
            summary = module.run(config, run)
    print(json.dumps({"command": args.command, **(summary or {})}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
