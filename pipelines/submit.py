"""`raylm submit CONFIG --address http://HEAD:8265`: run a raylm config on a Ray cluster as a Ray job.

The config is any raylm config (a lifecycle config for `raylm run` by default; another command with
``submit.command``) plus an optional ``submit`` section. It is validated here, on the laptop, before
anything is sent; paths in it are read on the cluster, relative to the job's working directory.

The job's working directory is the current directory (the repository root) without the raylm
sources, the virtual environment and outputs: the cluster runs the raylm installed on its nodes
(cluster/aws.yaml and cluster/gcp.yaml install it from the synced repository, the KubeRay image
holds it), and the working directory carries the configs, task files and data they name.

    raylm submit examples/cluster.yaml --address http://127.0.0.1:8265            # submit, follow the logs
    raylm submit examples/cluster.yaml --address http://127.0.0.1:8265 --no-follow
    raylm submit --address http://127.0.0.1:8265 --status raylm-...
    raylm submit --address http://127.0.0.1:8265 --stop raylm-...

The address is the Ray dashboard's; reach it through an SSH tunnel (`ray dashboard cluster/aws.yaml`)
or `kubectl port-forward`, never by opening it to the internet: Ray's job API has no authentication
of its own, and whoever reaches it runs code on every node.

What is uploaded: ``submit.working_dir`` minus ``EXCLUDES`` (sources, environments, outputs, VCS),
``SECRETS`` (``.env``, keys, certificates, credential files), every pattern of the working
directory's ``.gitignore``, and ``submit.excludes``. The job commands (``--status``, ``--logs``,
``--stop``) take a job id alone: ``raylm submit --address URL --status JOB_ID``.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from raylm.config import ConfigError, Section, format_validation_error
from raylm.stages import LIFECYCLE

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# Never uploaded: the sources (the cluster's installed raylm runs), environments, outputs, VCS.
EXCLUDES = [".git", ".venv", "venv", "out", "logs", "*.db", "mlruns", "mlartifacts", "__pycache__",
            "raylm", "models", "actors", "pipelines", "tests", "benchmarks"]
# Never uploaded, wherever they lie in the working directory: secrets a job has no need of, which
# would otherwise sit in the cluster's object store and on every node's disk.
SECRETS = [".env", ".env.*", "*.env", ".envrc", "*.pem", "*.key", "*.p12", "*.pfx", "*.jks", "*.keystore",
           "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", ".ssh", ".gnupg", ".aws", ".azure", ".kube",
           ".docker", ".netrc", ".pgpass", ".git-credentials", ".npmrc", ".pypirc", "credentials",
           "credentials.*", "*credentials*.json", "*service-account*.json", "*.tfstate", "*.tfvars", "secrets.*"]
NO_AUTH_NOTE = ("raylm submit: Ray's job API has no authentication: anyone who reaches {address} can run code "
                "on the cluster. Reach it only through a tunnel (`ray dashboard CLUSTER.yaml`, `ssh -L`, "
                "`kubectl port-forward`), never through an open port.")


class SubmitOptions(Section):
    command: Literal["run", *LIFECYCLE] = "run"  # the raylm command the job runs on this config
    working_dir: str = "."  # uploaded as the job's working directory (Ray's 500 MiB limit applies)
    excludes: list[str] = Field(default_factory=list)  # more paths (gitignore syntax) to leave out
    # environment variables of the job; MLFLOW_TRACKING_URI is added from --tracking-uri unless set here
    env_vars: dict[str, str] = Field(default_factory=dict)
    pip: list[str] = Field(default_factory=list)  # extra packages the job's environment installs
    entrypoint_num_cpus: float = Field(default=0, ge=0)  # the driver's CPUs (0: it only coordinates)
    entrypoint_resources: dict[str, float] = Field(default_factory=dict)  # e.g. pin the driver to a node type
    job_id_prefix: str = "raylm"  # job ids are <prefix>-<command>-<YYYYmmdd-HHMMSS>
    poll_seconds: float = Field(default=2.0, gt=0)  # seconds between status and log polls while following the job
    timeout_seconds: float | None = Field(default=None, gt=0)  # following gives up (the job goes on)


class Config(Section):
    """``submit`` is this command's own section; everything else is the submitted config, kept as
    written and validated against ``submit.command``'s config class by ``check``."""

    submit: SubmitOptions = Field(default_factory=SubmitOptions)
    submitted: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _split(cls, data):
        if not isinstance(data, dict):
            return data
        data = dict(data)
        return {"submit": data.pop("submit", {}), "submitted": data}


def check(config: Config, config_path) -> None:
    """The submitted config must be valid for its command (types, keys, values). Files it names are
    read on the cluster, so they are not looked for here."""
    from raylm.stages import stage_module

    module = stage_module(config.submit.command)
    try:
        submitted = module.Config.model_validate(config.submitted)
    except ValidationError as e:
        raise ConfigError(format_validation_error(str(config_path), e)) from None
    if config.submit.command == "run":  # each stage's section against its stage's config class
        for stage in submitted.stages:
            module.stage_config(submitted, stage, config_path)
    working_dir = Path(config.submit.working_dir).resolve()
    if not working_dir.is_dir():
        raise ConfigError(f"{config_path}: submit.working_dir: {working_dir} is not a directory")
    if not Path(config_path).resolve().is_relative_to(working_dir):
        raise ConfigError(f"{config_path}: the config must lie inside submit.working_dir ({working_dir}) "
                          f"for the job to find it: run `raylm submit` from the folder its relative paths "
                          f"start from (the repository root for examples/), or "
                          f"--set submit.working_dir={Path(config_path).resolve().parent}")


def entrypoint(config: Config, config_path: str, overrides: list[str], tracking_uri: str | None) -> str:
    relative = Path(config_path).resolve().relative_to(Path(config.submit.working_dir).resolve())
    words = ["raylm", config.submit.command, relative.as_posix()]
    for override in overrides:
        if not override.startswith("submit."):
            words += ["--set", override]
    if tracking_uri:
        words += ["--tracking-uri", tracking_uri]
    return shlex.join(words)


def gitignore_patterns(working_dir: Path) -> list[str]:
    """The patterns of ``working_dir/.gitignore`` (gitignore syntax, which Ray's excludes share)."""
    path = working_dir / ".gitignore"
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    return [line.rstrip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def excludes(config: Config) -> list[str]:
    working_dir = Path(config.submit.working_dir).resolve()
    return EXCLUDES + SECRETS + gitignore_patterns(working_dir) + list(config.submit.excludes)


def runtime_env(config: Config, tracking_uri: str | None) -> dict:
    env_vars = dict(config.submit.env_vars)
    if tracking_uri:
        env_vars.setdefault("MLFLOW_TRACKING_URI", tracking_uri)
    env = {"working_dir": str(Path(config.submit.working_dir).resolve()),
           "excludes": excludes(config), "env_vars": env_vars}
    if config.submit.pip:
        env["pip"] = list(config.submit.pip)
    return env


def follow(client, job_id: str, options: SubmitOptions) -> str:
    """Print the job's log as it grows until the job ends (or ``timeout_seconds``); its status."""
    printed, start = 0, time.monotonic()
    while True:
        status = str(client.get_job_status(job_id).value)
        logs = client.get_job_logs(job_id)
        if len(logs) > printed:
            sys.stdout.write(logs[printed:])
            sys.stdout.flush()
            printed = len(logs)
        if status in TERMINAL:
            return status
        if options.timeout_seconds is not None and time.monotonic() - start > options.timeout_seconds:
            print(f"raylm submit: stopped following job {job_id} after {options.timeout_seconds:.0f}s; "
                  f"it is {status} and goes on", flush=True)
            return status
        time.sleep(options.poll_seconds)


def submit_with_retries(client, wait_seconds: float = 120, **job) -> None:
    """A cluster that has just started has no job agent for a while ("No available agent to submit
    job"): retry until one answers or ``wait_seconds`` pass."""
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            client.submit_job(**job)
            return
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            print("raylm submit: the cluster's job agent is not up yet; retrying", flush=True)
            time.sleep(2)


def job_command(args) -> int:
    """``--status``, ``--logs`` or ``--stop`` JOB_ID: needs the address and the job id, no config."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(args.address)
    if args.stop:
        stopped = client.stop_job(args.stop)
        print(f"raylm submit: job {args.stop} {'is stopping' if stopped else 'was not running'}")
        return 0
    if args.status:
        info = client.get_job_info(args.status)
        print(f"raylm submit: job {args.status}: {info.status.value}" + (f" ({info.message})" if info.message else ""))
        return 0 if str(info.status.value) != "FAILED" else 1
    sys.stdout.write(client.get_job_logs(args.logs))
    return 0


def submit(config: Config, args) -> int:
    from ray.job_submission import JobSubmissionClient

    print(NO_AUTH_NOTE.format(address=args.address), file=sys.stderr, flush=True)
    client = JobSubmissionClient(args.address)
    job_id = f"{config.submit.job_id_prefix}-{config.submit.command}-{time.strftime('%Y%m%d-%H%M%S')}"
    command = entrypoint(config, args.config, args.overrides, args.tracking_uri)
    submit_with_retries(client, entrypoint=command, submission_id=job_id,
                        runtime_env=runtime_env(config, args.tracking_uri),
                        entrypoint_num_cpus=config.submit.entrypoint_num_cpus,
                        entrypoint_resources=config.submit.entrypoint_resources or None)
    print(f"raylm submit: job {job_id} submitted to {args.address}: {command}", flush=True)
    print(f"  status: raylm submit --address {args.address} --status {job_id}\n"
          f"  logs:   raylm submit --address {args.address} --logs {job_id}\n"
          f"  stop:   raylm submit --address {args.address} --stop {job_id}", flush=True)
    if not args.follow:
        return 0
    status = follow(client, job_id, config.submit)
    print(f"raylm submit: job {job_id} {status}", flush=True)
    return 0 if status == "SUCCEEDED" else 1
