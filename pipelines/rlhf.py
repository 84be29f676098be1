"""`raylm rlhf`: PPO (or critic-free GRPO / RLOO) over separate Ray actor pools.

The pools (``raylm.rl.pools``, placed in one place by ``raylm.rl.placement``): the policy and the
critic are trainer groups (FSDP2 ranks), the rollout engines vLLM (raylm's own generator where vLLM
cannot serve), beside reward-model scorers and the frozen reference. This file is the algorithm.

Each step (``ppo_step``): sample prompts -> rollouts (each records the policy version that produced
it; with ``rollout.max_staleness`` the engines run that many steps ahead, ``raylm.rl.rollouts``) ->
rewards (the reward model, a verifiable rule or function, or both: ``raylm.rl.rewards``) -> reference
log-probs (and the policy's own and the critic's values) ->
KL-penalised rewards -> advantages (GAE, or group baselines) -> PPO clipped policy loss and value
loss over ``ppo.epochs`` epochs of ``ppo.minibatches`` minibatches (the GRPO family's options:
asymmetric clipping, token- or sequence-level aggregation, overlong filtering, truncated importance
sampling for the engines' log-probs; see docs/rl.md) -> the new weights are published
once to the object store in buckets and every engine loads them (``raylm.rl.weight_sync``). Every
remote wait has a timeout (``timeouts``).

Log-probabilities (policy, reference, entropy) are those of softmax(logits / rollout.temperature),
the distribution the rollouts were sampled from; the engines report the same (vLLM's
``processed_logprobs``). Each rollout has its own sampling seed (from the run's seed and the step).

With a ``peft:`` method the policy trains adapters on its frozen base and each step only the
adapter travels to the engines: LoRA, which vLLM serves with its LoRA support on its base; a soft
prompt (``prompt_tuning``), which vLLM takes as input embeddings before each prompt's own; or
bottleneck adapters, which vLLM cannot serve, so the rollout pool is raylm's own generator with the
same adapters. ``freeze.train_layers`` trains only some blocks of the policy (full weights are
published).

Every ``checkpoint.every`` steps the run writes ``<output_dir>/checkpoints/step_N``
(``raylm.rl.checkpoint``); a rerun on the same output_dir resumes from the newest complete one. A
rollout engine, reward scorer or reference actor that dies is replaced in its placement bundle and
its work retried, at most ``faults.max_actor_restarts`` times per role (``raylm.rl.actor_pool``). A
policy or critic rank that dies takes its group with it (the survivors wait in a collective): the
group is replaced in its bundles, every trainer reloads this run's newest checkpoint (the starting
weights without one) and the run goes on from there in the same process, at most
``faults.max_trainer_restarts`` times per group; the summary and MLflow count the restarts.

Before the first and after the last step, policy samples on fixed prompts are scored by the reward
model and by the ground truth (``raylm.rl.evaluation``), with the KL to the reference; per-step
metrics and the final policy (``<output_dir>/hf``; a LoRA policy merged, its adapter in
``hf/adapter``) go to MLflow.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from raylm.actors.trainer_group import TrainerRankDied
from raylm.rl.batching import make_batch, pad_rows
from raylm.rl.checkpoint import RunState, latest_checkpoint, load_checkpoint, save_checkpoint
from raylm.rl.config import Config, check  # noqa: F401  (the CLI reads a stage's Config and check here)
from raylm.rl.evaluation import evaluate, fmt, log_eval, paired_gain, samples_text, strip_samples
from raylm.rl.pools import Pools
from raylm.rl.prompts import PromptSampler, Task
from raylm.rl.rollouts import RolloutQueue
from raylm.tracking import Progress, StageRun

log = logging.getLogger("raylm.rlhf")


def run(config: Config, stage_run: StageRun) -> dict:
    """Ray is up (``raylm.stages.run_stage`` started it)."""
    task = Task(config)
    pools = Pools.start(config)
    try:
        return train(config, stage_run, pools, task)
    finally:
        pools.shutdown()


def train(config: Config, stage_run: StageRun, pools: Pools, task: Task) -> dict:
    """The whole run on pools that are already up (tests start the pools once and train twice).
    Continues from the newest complete checkpoint under ``output_dir`` when there is one. A trainer
    group that loses a rank is replaced and the run goes on from this run's newest checkpoint (from
    the start without one), at most ``faults.max_trainer_restarts`` times per group."""
    started = time.perf_counter()
    stage_run.set_tags({"raylm.rollout_backend": pools.backend})
    print(f"[rlhf] rollout backend: {pools.backend}; {len(task.train)} training prompts, "
          f"{len(task.held_out)} held out", flush=True)
    counts = pools.setup_trainers(config)
    stage_run.log_metrics(counts)
    print(f"[rlhf] policy: {counts['policy/trainable_params']:,} of {counts['policy/params']:,} parameters train",
          flush=True)
    resume_from = latest_checkpoint(config) if config.checkpoint.resume else None
    state, sampler, rollouts, record = restore(config, stage_run, pools, task, resume_from)
    if resume_from is not None:
        msg = (f"resuming from {resume_from} (step {record['step']}, policy version {state.version}, "
               f"KL coef {state.kl_ctl.value:.4g}, prompt {sampler.position} of the epoch)")
        log.info(msg)
        print(f"[rlhf] {msg}", flush=True)
        stage_run.set_tags({"raylm.resumed_from": str(resume_from)})

    eval_items = task.train[:config.eval.prompts]
    held_out = task.held_out[:config.eval.prompts]
    samples, temperature = config.eval.samples_per_prompt, config.rollout.temperature
    if resume_from is None:
        record.update(before=evaluate(config, pools, task, eval_items, samples, temperature, config.seed),
                      before_held_out=evaluate(config, pools, task, held_out, samples, temperature, config.seed))
        log_eval(stage_run, "before", record["before"], record["before_held_out"], step=0)
    before, before_held_out, history = record["before"], record["before_held_out"], record["history"]

    newest = resume_from  # this run's newest checkpoint: where a replaced trainer group resumes
    restarts = []  # every trainer group replaced: {"group", "rank", "step", "resumed_from_step"}
    kill_at = config.faults.kill_trainer_at_step
    progress = Progress(config.ppo.steps, "rlhf")
    step = record["step"] + 1
    while step <= config.ppo.steps:
        if step == kill_at:
            kill_at = None  # once: the step is done again after the replacement
            print(f"[rlhf] faults.kill_trainer_at_step: policy rank {config.faults.kill_trainer_rank} exits at "
                  f"step {step}", flush=True)
            pools.policy.crash(config.faults.kill_trainer_rank)
        try:
            metrics = ppo_step(config, pools, task, rollouts, state, step)
            metrics["faults/actors_replaced"] = len(pools.replacements)
            metrics["faults/trainer_restarts"] = len(restarts)
            history.append({k: metrics.get(k) for k in HISTORY_KEYS})
            stage_run.log_metrics(metrics, step=step)
            progress.update(step, reward=metrics["reward/mean"], truth=metrics["ground_truth/mean"] or 0.0,
                            kl=metrics["kl/mean"], pg=metrics["policy/loss"], clip=metrics["policy/clip_fraction"],
                            sync_s=metrics["time/weight_sync_s"],
                            **({"turns": metrics["tools/turns_mean"], "tool_calls": metrics["tools/calls"],
                                "tool_tokens": metrics["tools/tool_tokens"]} if config.rollout.tools else {}))
            if config.checkpoint.every and (step % config.checkpoint.every == 0 or step == config.ppo.steps):
                newest = save_checkpoint(config, pools.policy, pools.critic, state, rollouts.sampler_state(step + 1),
                                         step, {"before": before, "before_held_out": before_held_out,
                                                "history": history})
        except TrainerRankDied as died:
            pools.replace_trainer_group(died, config.faults.max_trainer_restarts)
            pools.setup_trainers(config)
            state, sampler, rollouts, record = restore(config, stage_run, pools, task, newest)
            history = record["history"]
            msg = (f"replaced {died.group} rank {died.rank} (it died in {died.what} at step {step}); "
                   f"resumed from step {record['step']}" + (f" ({newest})" if newest is not None else
                                                            " (no checkpoint yet: the starting weights)"))
            log.warning(msg)
            print(f"[rlhf] {msg}", flush=True)
            restarts.append({"group": died.group, "rank": died.rank, "step": step, "resumed_from_step": record["step"]})
            step = record["step"] + 1
            continue
        if step == config.faults.stop_after_step:
            print(f"[rlhf] faults.stop_after_step: stopping after step {step}", flush=True)
            return {"stopped_after_step": step, "policy_version": state.version, "steps": config.ppo.steps}
        step += 1

    after = evaluate(config, pools, task, eval_items, samples, temperature, config.seed)
    after_held_out = evaluate(config, pools, task, held_out, samples, temperature, config.seed)
    log_eval(stage_run, "after", after, after_held_out, step=config.ppo.steps)

    export_dir = (config.output_path / "hf").resolve()
    pools.policy.save(str(export_dir), str(config.tokenizer_file.resolve()))
    stage_run.log_artifact(export_dir, "model")
    wall = time.perf_counter() - started
    summary = {
        "checkpoint": str(export_dir), "steps": config.ppo.steps, "rollout_backend": pools.backend,
        "policy_version": state.version, "wall_s": wall,
        "resumed_from": str(resume_from) if resume_from is not None else None,
        "actors_replaced": [f"{role} {i}" for role, i in pools.replacements],
        "trainer_restarts": restarts,
        "before": strip_samples(before), "after": strip_samples(after),
        "before_held_out": strip_samples(before_held_out), "after_held_out": strip_samples(after_held_out),
        "logprob_diff_vs_trainer": float(np.mean([m["rollout/logprob_diff_vs_trainer"] for m in history])),
        "weight_sync_s": float(np.mean([m["time/weight_sync_s"] for m in history])),
        "max_kl": float(max(m["kl/mean"] for m in history)),
        "held_out_rule_gain": paired_gain(before_held_out, after_held_out),
        "history": [{k: m.get(k) for k in ("reward/mean", "ground_truth/mean", "kl/mean", "policy/loss",
                                           "policy/clip_fraction", "reward/rule_mean")
                     + (TOOL_KEYS if config.rollout.tools else ())} for m in history],
        "step_s": [m.get("time/step_s") for m in history],
    }
    stage_run.log_metrics({"wall_s": wall, "faults/trainer_restarts": len(restarts)})
    if summary["held_out_rule_gain"] is not None:
        gain = summary["held_out_rule_gain"]
        stage_run.log_metrics({"eval_held_out/rule_gain": gain["mean"], "eval_held_out/rule_gain_low": gain["low"],
                               "eval_held_out/rule_gain_high": gain["high"]}, step=config.ppo.steps)
        print(f"[rlhf] held-out {config.reward.rule} score {fmt(before_held_out['rule'])} -> "
              f"{fmt(after_held_out['rule'])}: gain {gain['mean']:+.4f} (95% interval {gain['low']:+.4f} to "
              f"{gain['high']:+.4f}, {gain['n']} prompts)", flush=True)
    stage_run.log_dict(summary, "summary.json")
    if after:
        stage_run.log_text(samples_text(before, after), "samples.txt")
    print(f"[rlhf] reward {fmt(before.get('reward'))} -> {fmt(after.get('reward'))}, ground truth "
          f"{fmt(before.get('ground_truth'))} -> {fmt(after.get('ground_truth'))}, KL to reference "
          f"{fmt(after.get('kl'))}; wrote {export_dir}", flush=True)
    return summary


def restore(config: Config, stage_run: StageRun, pools: Pools, task: Task,
            folder: Path | None) -> tuple[RunState, PromptSampler, RolloutQueue, dict]:
    """The driver's state at the start of the run, or as of checkpoint ``folder`` (loaded into the
    trainers, which are set up); then the engines get the trainers' weights. -> (the run state, the
    prompt sampler, a rollout queue, the driver's record: ``{"step", "history", ...}``)."""
    from raylm.rl.ppo import AdaptiveKLController, FixedKLController, RunningMoments

    state = RunState()
    state.kl_ctl = (AdaptiveKLController(config.kl.coef, config.kl.target, config.kl.horizon) if config.kl.adaptive
                    else FixedKLController(config.kl.coef))
    state.moments = RunningMoments() if config.reward.normalize else None
    sampler = PromptSampler(task.train, config.seed)
    record = {"step": 0, "history": []}
    if folder is not None:
        record = load_checkpoint(folder, pools.policy, pools.critic, state, sampler)
    # The engines serve the trainer's own copy of the weights (the starting ones, or the checkpoint's).
    initial_sync = pools.publish(state.version)
    stage_run.log_metrics({f"initial_{k}": v for k, v in initial_sync.items()}, step=record["step"])
    return state, sampler, RolloutQueue(config, pools, task, sampler), record


# What the summary keeps of each step (and a checkpoint, for a resumed run's summary).
TOOL_KEYS = ("tools/turns_mean", "tools/calls", "tools/tool_tokens", "tools/model_tokens")  # rollout.tools
HISTORY_KEYS = TOOL_KEYS + ("reward/mean", "ground_truth/mean", "kl/mean", "policy/loss", "policy/clip_fraction",
                             "rollout/logprob_diff_vs_trainer", "time/weight_sync_s", "time/step_s",
                             "reward/rule_mean", "rollout/staleness_max")


def ppo_step(config: Config, pools: Pools, task: Task, rollouts: RolloutQueue, state: RunState, step: int) -> dict:
    from raylm.rl.ppo import (
        gae,
        group_advantages,
        kl_estimate,
        kl_penalised_rewards,
        masked_mean,
        normalise_scores,
        truncated_importance_weights,
        truncated_responses,
        whiten,
    )

    ppo, kl_cfg = config.ppo, config.kl
    temperature = config.rollout.temperature
    times, started = {}, time.perf_counter()

    # 1-3. prompts, rollouts (each stamped with the policy version that produced it: this one, or with
    # rollout.max_staleness up to that many older) and their rewards; the ground truth for the record only
    t = time.perf_counter()
    got = rollouts.next(step, state.version)
    times["time/rollout_s"] = time.perf_counter() - t
    owners, prompts, responses, scores = got.owners, got.prompts, got.responses, got.scores.total
    batch = make_batch(prompts, responses, got.masks)  # with rollout.tools: 1 on model tokens only
    mask = batch["response_mask"]
    engine_logprobs = pad_rows(got.engine_logprobs, mask.shape[1])
    truth = [x for x in (task.ground_truth(o, r) for o, r in zip(owners, responses)) if x is not None]

    # 4. reference log-probs; the policy's own log-probs and the critic's values of the same tokens
    # (log-probs of softmax(logits / temperature), the distribution the rollouts were sampled from)
    t = time.perf_counter()
    policy_logprobs = pools.policy.logprobs(batch, temperature)
    critic_values = pools.critic.values(batch) if pools.critic is not None else None
    ref_logprobs = pools.reference_logprobs(batch, temperature)
    old_logprobs = policy_logprobs.result()
    values = critic_values.result() if critic_values is not None else None
    times["time/logprobs_s"] = time.perf_counter() - t

    # 5. KL-penalised rewards
    kl = kl_estimate(old_logprobs, ref_logprobs, kl_cfg.estimator) * mask
    kl_per_response = kl.sum(-1)
    normalised = normalise_scores(scores, state.moments, config.reward.clip)
    penalty = state.kl_ctl.value if kl_cfg.mode == "reward" else 0.0

    # 6. advantages: GAE over the critic's values, or a group baseline over each prompt's samples
    if config.uses_critic:
        rewards = kl_penalised_rewards(normalised, kl, mask, penalty)
        advantages, returns = gae(rewards, values, mask, ppo.gamma, ppo.lam)
    else:
        advantages = group_advantages(normalised, ppo.samples_per_prompt, ppo.advantage,
                                      kl_penalty=penalty * kl_per_response if penalty else None)[:, None] * mask
        returns = None
    if ppo.whiten_advantages:
        advantages = whiten(advantages, mask)

    # 7. PPO: clipped policy loss (and the value loss) over epochs of minibatches, policy and critic at once.
    # Overlong filtering: responses the length limit cut carry no policy loss. Truncated IS: each token's
    # loss weighted by min(trainer / engine probability, tis_cap), for the engines' numerics and staleness.
    t = time.perf_counter()
    train_batch = {**batch, "old_logprobs": old_logprobs, "advantages": advantages, "ref_logprobs": ref_logprobs}
    cut = truncated_responses(responses, task.stop_ids, config.rollout.max_new_tokens)
    if ppo.overlong_filter:
        train_batch["loss_mask"] = mask * (~cut).to(mask.dtype)[:, None]
    is_stats = {}
    if ppo.tis_cap is not None:
        train_batch["is_weights"], is_stats = truncated_importance_weights(old_logprobs, engine_logprobs, mask,
                                                                           ppo.tis_cap)
    kl_loss_coef = state.kl_ctl.value if kl_cfg.mode == "loss" else 0.0
    clip_low, clip_high = ppo.clip_range
    policy_update = pools.policy.update(
        train_batch, epochs=ppo.epochs, minibatches=ppo.minibatches, clip_eps=clip_low, clip_high=clip_high,
        aggregation=ppo.loss_aggregation, entropy_coef=ppo.entropy_coef, kl_loss_coef=kl_loss_coef,
        kl_estimator=kl_cfg.estimator, step=step, temperature=temperature)
    critic_update = (pools.critic.update({**batch, "old_values": values, "returns": returns}, epochs=ppo.epochs,
                                         minibatches=ppo.minibatches, value_clip_eps=ppo.value_clip_eps, step=step)
                     if pools.critic is not None else None)
    metrics = policy_update.result()
    if critic_update is not None:
        metrics.update(critic_update.result())
    times["time/update_s"] = time.perf_counter() - t

    # 8. publish the new weights once; every engine loads them and serves the new version
    t = time.perf_counter()
    state.version += 1
    metrics.update(pools.publish(state.version))
    times["time/weight_sync_s"] = time.perf_counter() - t

    mean_kl = kl_per_response.mean().item()
    kl_coef = state.kl_ctl.value
    state.kl_ctl.update(mean_kl, len(prompts))
    lag = torch.tensor([state.version - 1 - v for v in got.versions], dtype=torch.float32)
    metrics.update(times)
    metrics.update(got.scores.metrics())
    metrics.update(is_stats)
    metrics.update({
        "reward/mean": scores.mean().item(), "reward/std": scores.std().item() if len(scores) > 1 else 0.0,
        "reward/normalised_mean": normalised.mean().item(),
        "ground_truth/mean": float(np.mean(truth)) if truth else None,
        "kl/mean": mean_kl, "kl/per_token": masked_mean(kl, mask).item(), "kl/coef": kl_coef,
        "advantages/mean": masked_mean(advantages, mask).item(),
        "response/length": mask.sum(-1).mean().item(), "response/truncated_fraction": cut.float().mean().item(),
        "rollout/logprob_diff_vs_trainer": masked_mean((engine_logprobs - old_logprobs).abs(), mask).item(),
        "policy_version": state.version, "rollout/policy_version": min(got.versions),
        "rollout/staleness_mean": lag.mean().item(), "rollout/staleness_max": lag.max().item(),
        "time/step_s": time.perf_counter() - started,
    })
    if got.turns is not None:
        tool_tokens = sum(len(r) for r in responses) - int(mask.sum())
        metrics.update({"tools/turns_mean": float(np.mean(got.turns)), "tools/calls_mean": float(np.mean(got.tool_calls)),
                        "tools/calls": int(sum(got.tool_calls)), "tools/tool_tokens": tool_tokens,
                        "tools/model_tokens": int(mask.sum())})
    if ppo.dynamic_sampling:
        metrics.update({"dynamic_sampling/rounds": got.rounds, "dynamic_sampling/dropped_groups": got.dropped_groups})
    if values is not None:
        metrics["critic/values_mean"] = masked_mean(values, mask).item()
    return metrics
