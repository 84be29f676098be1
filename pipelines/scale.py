"""`raylm scale`: scaling laws and a compute-optimal plan from a sweep of real pretraining runs.

Every model size of ``sweep.models`` is trained at every FLOP budget of ``sweep.flop_budgets``
(an IsoFLOP grid: D = C / 6N tokens, rounded to whole steps) with pretraining's Ray Train loop, each
run a Ray Tune trial (Tune runs as many at once as the cluster's CPUs hold: each trial's Ray Train
workers request ``parallel.num_workers * parallel.cpus_per_worker`` CPUs) and each one an MLflow run
nested in the stage's. From their final validation losses (``raylm.scaling``):

- approach 3: L(N, D) = E + A/N^alpha + B/D^beta, Huber fit with a bootstrap interval on the exponents;
- approach 2: a parabola in log N per budget, its minimum, and N_opt ~ C^a across budgets;
- the plan at ``check.flop_budget``: the compute-optimal N, D and the predicted loss, then one more
  run at that budget, of the model size nearest N_opt, whose loss checks the prediction.

N counts non-embedding parameters and C = 6 N D FLOPs. Written to ``<output_dir>``: ``scaling.json``
(runs, fits, plan, check) and ``plots/`` (loss curves, IsoFLOP profiles, frontier), all logged to
the stage's MLflow run.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from raylm.config import ConfigError, InputPath, ModelStageConfig, Section, expand_model_preset
from raylm.tracking import StageRun, start_run
from raylm.data.token_shards import shard_dir
from raylm.train.config import OptimConfig, ParallelConfig, TrainConfig

# The fields of a sweep entry that shape a model; every other model field comes from `model`.
SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
                "n_experts", "top_k", "n_shared_experts", "moe_ffn_dim")
# Set per trial from its budget: a value in the config would not be what runs.
TRIAL_PROCESS_MEMORY = 256 << 20  # bytes: the Tune trial's process (it drives its Ray Train run)
PER_TRIAL = {"train": ("steps", "eval_every", "checkpoint_every", "resume"), "optim": ("warmup_steps",)}


class SweepConfig(Section):
    """The grid: every model size at every FLOP budget."""

    # Model sizes: each a `preset` name and/or shape fields (dim, n_layers, n_heads, n_kv_heads,
    # head_dim, ffn_dim, MoE fields); the other model fields (vocab_size, max_seq_len, ...) come from `model`.
    models: list[dict[str, Any]] = Field(default_factory=lambda: [
        {"dim": 16, "n_layers": 1, "n_heads": 1}, {"dim": 32, "n_layers": 1, "n_heads": 2},
        {"dim": 32, "n_layers": 2, "n_heads": 2}, {"dim": 64, "n_layers": 2, "n_heads": 4}])
    flop_budgets: list[float] = Field(default_factory=lambda: [2e9, 5e9, 1.2e10])  # C = 6 N D FLOPs, one IsoFLOP profile each
    min_steps: int = Field(default=10, ge=1)  # a (size, budget) pair with fewer steps is left out (and said so)
    warmup_fraction: float = Field(default=0.1, ge=0, lt=1)  # each trial's warmup steps: this fraction of its steps
    trial_retries: int = Field(default=1, ge=0)  # times a failed trial starts over (its failed attempt stays in MLflow)
    max_concurrent: int | None = Field(default=None, ge=1)  # trials at once; None: the cluster's CPUs / CPUs per trial


class FitConfig(Section):
    """How the scaling laws are fitted."""

    huber_delta: float = Field(default=1e-3, gt=0)  # Huber loss threshold on log-loss residuals (Chinchilla's)
    starts: int = Field(default=20, ge=1)  # BFGS runs from the best points of the initialisation grid
    bootstrap: int = Field(default=100, ge=0)  # resamples of the runs for the exponents' interval; 0: none
    confidence: float = Field(default=0.95, gt=0, lt=1)  # the bootstrap interval's coverage


class CheckConfig(Section):
    """The run that checks the plan's prediction."""

    flop_budget: float | None = Field(default=None, gt=0)  # C of the plan and check run; None: 3x the largest sweep budget
    run: bool = True  # false: predict only
    model: dict[str, Any] | None = None  # the check run's shape fields; None: the size nearest the predicted N_opt


class Config(ModelStageConfig):
    data_dir: InputPath = "out/data"  # `raylm data`'s output_dir (shards in tokens/), or a folder holding index.json
    tokenizer: InputPath | None = None  # shipped with each trial's model; None: the data stage's tokenizer.json
    # each trial's training loop (steps, eval_every, checkpoint_every and resume are set per trial from its budget)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(batch_size=8, seq_len=128, eval_batches=8))
    # each trial's AdamW and schedule (warmup_steps set per trial: sweep.warmup_fraction of its steps)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    # each trial's Ray Train workers; a trial asks for num_workers * cpus_per_worker CPUs
    parallel: ParallelConfig = Field(default_factory=lambda: ParallelConfig(num_workers=1))
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    fit: FitConfig = Field(default_factory=FitConfig)
    check: CheckConfig = Field(default_factory=CheckConfig)

    @model_validator(mode="after")
    def _per_trial(self):
        for section, keys in PER_TRIAL.items():
            for key in keys:
                if key in getattr(self, section).model_fields_set:
                    raise ValueError(f"{section}.{key}: set per trial by `raylm scale` (from its FLOP budget); "
                                     "remove it")
        return self


# ---- the grid --------------------------------------------------------------------------------

def model_for(config: Config, shape: dict, where: str):
    """The TransformerConfig of one size: ``shape``'s fields over `model`'s others."""
    from raylm.models.config import TransformerConfig

    try:
        shape = expand_model_preset(dict(shape))
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    unknown = sorted(set(shape) - set(SHAPE_FIELDS))
    if unknown:
        shared = [k for k in unknown if k in TransformerConfig.__dataclass_fields__]
        raise ConfigError(f"{where}: {', '.join(unknown)}: " + (
            "set for every size in `model`, not per size" if len(shared) == len(unknown) else "unknown key"))
    base = {k: v for k, v in config.model.to_dict().items() if k not in SHAPE_FIELDS}
    try:
        model = TransformerConfig(**base, **shape)
        model.validate()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None
    return model


def tokens_per_step(config: Config) -> int:
    p = config.parallel
    return config.train.batch_size * config.train.grad_accum * config.train.seq_len * (p.num_workers // (p.tp * p.cp * p.pp))


def trial_plan(config: Config, name: str, shape: dict, model, flops: float, budget: float | None) -> dict:
    from raylm.scaling import non_embedding_params, training_flops

    n = non_embedding_params(model)
    per_step = tokens_per_step(config)
    steps = max(1, round(flops / (6 * n * per_step)))
    return {"name": name, "shape": shape, "model": model.to_dict(), "n": n, "steps": steps, "d": steps * per_step,
            "flops": training_flops(n, steps * per_step), "budget": budget}


def plan_sweep(config: Config, config_path=None) -> tuple[list[dict], list[str]]:
    """-> (trials, what was left out and why)."""
    trials, skipped = [], []
    for i, shape in enumerate(config.sweep.models):
        model = model_for(config, shape, f"{config_path}: sweep.models[{i}]")
        for budget in config.sweep.flop_budgets:
            trial = trial_plan(config, f"n{i}-c{budget:.2g}", shape, model, budget, budget)
            if trial["steps"] < config.sweep.min_steps:
                skipped.append(f"{trial['name']}: N={trial['n']:,} at C={budget:.3g} is {trial['steps']} steps "
                               f"(< sweep.min_steps={config.sweep.min_steps})")
            else:
                trials.append(trial)
    return trials, skipped


def check(config: Config, config_path) -> None:
    from raylm.train.launcher import check_token_data

    index = check_token_data(config, config_path)  # shards, vocabulary, sequence length, tokenizer: as pretrain's
    if not config.train.eval_batches:
        raise ConfigError(f"{config_path}: train.eval_batches: the fit needs each trial's validation loss")
    if not index["splits"].get("validation"):
        raise ConfigError(f"{config_path}: data_dir: no validation split in {shard_dir(config.data_dir)}")
    if config.check.model is not None:
        model_for(config, config.check.model, f"{config_path}: check.model")
    trials, _ = plan_sweep(config, config_path)
    sizes, budgets = {t["n"] for t in trials}, {t["budget"] for t in trials}
    if len(trials) < 5:
        raise ConfigError(f"{config_path}: sweep: {len(trials)} runs after sweep.min_steps; fitting L(N, D) "
                          "needs 5 or more (more sizes or budgets)")
    if len(sizes) < 3:
        raise ConfigError(f"{config_path}: sweep.models: {len(sizes)} distinct sizes; an IsoFLOP parabola needs 3")



def find_tokenizer(config: Config) -> Path | None:
    if config.tokenizer:
        return Path(config.tokenizer)
    shards = shard_dir(config.data_dir)
    return next((f / "tokenizer.json" for f in (shards, shards.parent) if (f / "tokenizer.json").exists()), None)


def train_tokens(config: Config) -> int:
    from raylm.data.token_shards import read_index

    return sum(e["tokens"] for e in read_index(shard_dir(config.data_dir))["splits"].get("train", []))


# ---- one trial: a pretraining run on Ray Train, an MLflow run ---------------------------------------

def run_trial(trial: dict, config: Config, parent: StageRun, role: str = "sweep") -> dict:
    """Pretrain one (size, budget) point with the pretraining worker loop; its own MLflow run,
    nested in the stage's. -> its final losses and where it is tracked."""
    from raylm.train.launcher import launch, training_spec
    from raylm.train.spec import TokenData

    started = time.perf_counter()
    run = start_run(parent.uri, "", f"scale-{trial['name']}", config.output_dir, parent=parent,
                    tags={"raylm.scale.role": role, "raylm.scale.trial": trial["name"]})
    status = "FAILED"
    try:
        steps = trial["steps"]
        run.log_params({"scale.n_params": trial["n"], "scale.tokens": trial["d"], "scale.flops": trial["flops"],
                        "scale.budget": trial["budget"], "scale.steps": steps,
                        **{f"model.{k}": v for k, v in trial["model"].items()}})
        # The trial's own run: its steps, validation and one checkpoint at its end, a fresh start.
        train = config.train.model_copy(update={"steps": steps, "eval_every": steps, "checkpoint_every": steps,
                                                "keep_checkpoints": 1, "resume": False})
        optim = config.optim.model_copy(update={"warmup_steps": int(config.sweep.warmup_fraction * steps)})
        folder = (config.output_path / "trials" / trial["name"]).resolve()
        trial_config = config.model_copy(update={"output_dir": str(folder), "train": train, "optim": optim})
        tokenizer = find_tokenizer(config)
        spec = training_spec(trial_config, f"scale-{trial['name']}", run, model=trial["model"],
                             data=TokenData(str(shard_dir(config.data_dir).resolve())),
                             tokenizer_file=str(tokenizer.resolve()) if tokenizer else None)
        metrics = launch(trial_config, spec)
        if metrics.get("val_loss") is None:
            raise RuntimeError(f"trial {trial['name']}: no validation loss at its last step")
        out = {**{k: trial[k] for k in ("name", "n", "d", "flops", "budget", "steps")},
               "val_loss": float(metrics["val_loss"]), "loss": float(metrics["loss"]), "run_id": run.run_id,
               "wall_s": time.perf_counter() - started, "role": role}
        run.log_metrics({"final_val_loss": out["val_loss"], "final_loss": out["loss"], "n_params": trial["n"],
                         "tokens": trial["d"], "flops": trial["flops"], "wall_s": out["wall_s"]})
        status = "FINISHED"
        return out
    finally:
        run.client.set_terminated(run.run_id, status)


def tune_trial(param: dict, config: Config, parent: StageRun) -> None:
    """A Ray Tune trial: the run of ``param["trial"]``, its result reported to Tune."""
    from ray import tune

    tune.report(run_trial(param["trial"], config, parent))


def run_sweep(config: Config, stage_run: StageRun, trials: list[dict]) -> tuple[list[dict], list[str]]:
    """The trials on Ray Tune. -> (results, failures)."""
    import ray
    from ray import tune

    from raylm.console import CONSOLE

    # Tune runs each trial in a folder of its own: the paths the trials read and write, made absolute.
    config = config.model_copy(update={
        "output_dir": str(config.output_path.resolve()), "data_dir": str(Path(config.data_dir).resolve()),
        "tokenizer": str(Path(config.tokenizer).resolve()) if config.tokenizer else None})
    per_trial = config.parallel.num_workers * config.parallel.cpus_per_worker
    concurrent = config.sweep.max_concurrent or max(1, int(ray.cluster_resources().get("CPU", 1) // per_trial))
    print(f"raylm scale: {len(trials)} trials on Ray Tune, {concurrent} at a time ({per_trial} CPU each)", flush=True)
    # The trial's own process only waits on its Ray Train run, whose workers hold the trial's CPUs:
    # it asks for memory alone (Tune refuses an empty request).
    trainable = tune.with_resources(tune.with_parameters(tune_trial, config=config, parent=stage_run),
                                    {"CPU": 0, "memory": TRIAL_PROCESS_MEMORY})
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(trials)},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, trial_name_creator=lambda t: t.config["trial"]["name"],
                                    trial_dirname_creator=lambda t: t.config["trial"]["name"]),
        run_config=tune.RunConfig(name=f"scale-{time.strftime('%Y%m%d-%H%M%S')}",
                                  storage_path=str((config.output_path / "tune").resolve()),
                                  verbose=1 if CONSOLE.verbose else 0,
                                  # a trial whose process died (e.g. killed by Ray's memory monitor) starts over
                                  failure_config=tune.FailureConfig(max_failures=config.sweep.trial_retries)),
    )
    with CONSOLE.library_prints_to_log():
        grid = tuner.fit()
    results, failures = [], []
    for r in grid:
        if r.error is not None:
            failures.append(f"{r.config['trial']['name']}: {type(r.error).__name__}: {str(r.error).splitlines()[0][:300]}")
        elif r.metrics and "val_loss" in r.metrics:
            results.append({k: r.metrics[k] for k in ("name", "n", "d", "flops", "budget", "steps", "val_loss", "loss",
                                                      "run_id", "wall_s", "role")})
    return sorted(results, key=lambda r: (r["budget"], r["n"])), failures


# ---- fits, plan, check --------------------------------------------------------------------------

def fit_laws(config: Config, results: list[dict]) -> dict:
    from raylm import scaling

    n = [r["n"] for r in results]
    d = [r["d"] for r in results]
    loss = [r["val_loss"] for r in results]
    out: dict = {"notes": []}
    fit = scaling.fit_loss(n, d, loss, config.fit.huber_delta, config.fit.starts)
    out["fit"] = fit
    if config.fit.bootstrap:
        out["bootstrap"] = scaling.bootstrap_fit(n, d, loss, fit, config.fit.bootstrap, config.fit.confidence,
                                                 seed=config.seed, delta=config.fit.huber_delta)
    minima = []
    for budget in sorted({r["budget"] for r in results}):
        runs = [r for r in results if r["budget"] == budget]
        try:
            minima.append(scaling.isoflop_minimum(budget, [r["n"] for r in runs], [r["val_loss"] for r in runs]))
        except ValueError as e:
            out["notes"].append(str(e))
    out["minima"] = minima
    out["isoflop_law"] = None
    if len(minima) >= 2:
        out["isoflop_law"] = scaling.fit_power_law([m.flops for m in minima], [m.n_opt for m in minima])
    else:
        out["notes"].append(f"approach 2: {len(minima)} IsoFLOP minima; the N_opt power law needs 2")
    return out


def check_shape(config: Config, n_opt: float) -> dict:
    """The check run's shape: ``check.model``, else the size nearest ``n_opt`` (in log N) among
    the sweep's sizes and their widenings / narrowings (dim in steps of one head, depth kept)."""
    from raylm.scaling import non_embedding_params

    if config.check.model is not None:
        return dict(config.check.model)
    best = None
    for i, shape in enumerate(config.sweep.models):
        model = model_for(config, shape, f"sweep.models[{i}]")
        candidates = [dict(shape)]
        if not model.is_moe:
            kv_ratio = model.n_heads // model.n_kv_heads
            for heads in range(kv_ratio, 4 * model.n_heads + 1, kv_ratio):
                dim = heads * model.head_dim
                candidates.append({"dim": dim, "n_layers": model.n_layers, "n_heads": heads,
                                   "n_kv_heads": heads // kv_ratio, "head_dim": model.head_dim,
                                   "ffn_dim": max(8, 8 * round(model.ffn_dim * dim / model.dim / 8))})
        for shape in candidates:
            distance = abs(math.log(non_embedding_params(model_for(config, shape, "check")) / n_opt))
            if best is None or distance < best[0]:
                best = (distance, shape)
    return best[1]


def plan(config: Config, laws: dict, budget: float) -> dict:
    fit = laws["fit"]
    n_opt, d_opt = fit.optimal(budget)
    out = {"flops": budget, "n_opt": n_opt, "d_opt": d_opt, "predicted_loss": float(fit.loss(n_opt, d_opt))}
    if laws["isoflop_law"] is not None:
        out["isoflop_n_opt"] = float(laws["isoflop_law"](budget))
        out["isoflop_d_opt"] = budget / (6 * out["isoflop_n_opt"])
    return out


def loss_curves(stage_run: StageRun, results: list[dict], per_step: int) -> list[dict]:
    from raylm.plots import history

    curves = []
    for r in results:
        steps, values = history(stage_run.client, r["run_id"], "loss")
        check = r.get("role") == "check"
        label = (f"check N={r['n']:,}" if check else f"N={r['n']:,} C={r['budget']:.2g}")
        curves.append({"label": label, "n": r["n"], "tokens": [s * per_step for s in steps], "loss": values,
                       "check": check})
    return curves


def run(config: Config, stage_run: StageRun) -> dict:
    started = time.perf_counter()
    trials, skipped = plan_sweep(config)
    for line in skipped:
        print(f"raylm scale: left out {line}", flush=True)
    available = train_tokens(config)
    most = max(t["d"] for t in trials)
    if most > available:
        print(f"raylm scale: the largest trial trains on {most:,} tokens, {most / available:.1f} epochs of the "
              f"{available:,} training tokens: repeated data bends the laws; use more data or smaller budgets",
              flush=True)
    results, failures = run_sweep(config, stage_run, trials)
    for line in failures:
        print(f"raylm scale: trial failed: {line}", flush=True)
    if len(results) < 5:
        raise RuntimeError(f"raylm scale: {len(results)} trials finished, fitting needs 5; failed: {failures}")
    for r in results:
        print(f"raylm scale: {r['name']:>12}  N={r['n']:>10,}  D={r['d']:>11,}  C={r['flops']:.3g}  "
              f"val_loss={r['val_loss']:.4f}", flush=True)

    laws = fit_laws(config, results)
    fit, boot = laws["fit"], laws.get("bootstrap")
    budget = config.check.flop_budget or 3 * max(config.sweep.flop_budgets)
    prediction = plan(config, laws, budget)
    ci = boot.intervals if boot else {}
    print(f"raylm scale: L(N, D) = {fit.E:.3f} + {fit.A:.4g}/N^{fit.alpha:.3f} + {fit.B:.4g}/D^{fit.beta:.3f}"
          + (f"  (alpha {ci['alpha'][0]:.3f}-{ci['alpha'][1]:.3f}, beta {ci['beta'][0]:.3f}-{ci['beta'][1]:.3f}, "
             f"{boot.confidence:.0%} bootstrap)" if boot else ""), flush=True)
    print(f"raylm scale: at C={budget:.3g}: N_opt={prediction['n_opt']:,.0f} D_opt={prediction['d_opt']:,.0f} "
          f"predicted loss {prediction['predicted_loss']:.4f}", flush=True)

    check_result = None
    if config.check.run:
        shape = check_shape(config, prediction["n_opt"])
        model = model_for(config, shape, "check.model")
        trial = trial_plan(config, f"check-c{budget:.2g}", shape, model, budget, budget)
        out = run_trial(trial, config, stage_run, role="check")
        predicted = float(fit.loss(out["n"], out["d"]))
        check_result = {**out, "shape": shape, "predicted_loss": predicted, "actual_loss": out["val_loss"],
                        "error": out["val_loss"] - predicted, "relative_error": (out["val_loss"] - predicted) / out["val_loss"]}
        print(f"raylm scale: check run N={out['n']:,} D={out['d']:,}: loss {out['val_loss']:.4f}, predicted "
              f"{predicted:.4f} (error {check_result['relative_error']:+.2%})", flush=True)

    summary = write_outputs(config, stage_run, results, skipped, failures, laws, prediction, check_result)
    summary["wall_s"] = time.perf_counter() - started
    stage_run.log_metrics({"wall_s": summary["wall_s"]})
    return summary


def write_outputs(config, stage_run, results, skipped, failures, laws, prediction, check_result) -> dict:
    from raylm import scaling

    out = config.output_path.resolve()
    fit, boot = laws["fit"], laws.get("bootstrap")
    report = {
        "conventions": "N: non-embedding parameters (active experts only); D: training tokens; C = 6 N D FLOPs; "
                       "loss: final validation loss (nats/token)",
        "runs": results, "skipped": skipped, "failed": failures,
        "approach3": {**fit.to_dict(), **({"bootstrap": boot.to_dict()} if boot else {})},
        "approach2": {"minima": [vars(m) for m in laws["minima"]],
                      "n_opt_law": vars(laws["isoflop_law"]) if laws["isoflop_law"] else None},
        "notes": laws["notes"], "plan": prediction, "check": check_result,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(report, indent=2, default=str))
    stage_run.log_artifact(out / "scaling.json")

    per_step = tokens_per_step(config)
    curves = loss_curves(stage_run, results + ([check_result] if check_result else []), per_step)
    profiles = {}
    for r in results:
        ns, losses = profiles.setdefault(r["budget"], ([], []))
        ns.append(r["n"])
        losses.append(r["val_loss"])
    plots = [scaling.plot_loss_curves(curves, out / "plots" / "loss_curves.png"),
             scaling.plot_isoflops(profiles, laws["minima"], out / "plots" / "isoflops.png", fit),
             scaling.plot_frontier(laws["minima"], out / "plots" / "frontier.png", fit, laws["isoflop_law"], boot,
                                   check_result and {"flops": check_result["flops"], "n": check_result["n"],
                                                     "actual_loss": check_result["actual_loss"],
                                                     "predicted_loss": check_result["predicted_loss"]})]
    for path in plots:
        stage_run.log_artifact(path, "plots")

    metrics = {"fit/E": fit.E, "fit/A": fit.A, "fit/B": fit.B, "fit/alpha": fit.alpha, "fit/beta": fit.beta,
               "fit/n_exponent": fit.n_exponent, "plan/flops": prediction["flops"], "plan/n_opt": prediction["n_opt"],
               "plan/d_opt": prediction["d_opt"], "plan/predicted_loss": prediction["predicted_loss"],
               "runs": len(results), "failed_runs": len(failures)}
    if boot:
        for key, (low, high) in boot.intervals.items():
            metrics[f"fit/{key}_low"], metrics[f"fit/{key}_high"] = low, high
    if laws["isoflop_law"] is not None:
        metrics["isoflop/n_exponent"] = laws["isoflop_law"].exponent
    if check_result:
        metrics.update({"check/n": check_result["n"], "check/d": check_result["d"],
                        "check/actual_loss": check_result["actual_loss"],
                        "check/predicted_loss": check_result["predicted_loss"],
                        "check/relative_error": check_result["relative_error"]})
    stage_run.log_metrics(metrics)
    return {"runs": len(results), "failed": failures, "skipped": len(skipped),
            "alpha": fit.alpha, "beta": fit.beta, "E": fit.E,
            **({f"{k}_interval": list(v) for k, v in boot.intervals.items() if k in ("alpha", "beta")} if boot else {}),
            "plan": prediction, "check": check_result and {k: check_result[k] for k in
                                                          ("n", "d", "actual_loss", "predicted_loss", "relative_error")},
            "report": str(out / "scaling.json"), "plots": [str(p) for p in plots]}
