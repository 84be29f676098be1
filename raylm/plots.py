"""PNG plots of a lifecycle's curves, drawn from the metric histories its stage runs logged to MLflow:
training and validation loss per training stage, and the reward and KL curves of RLHF."""

from __future__ import annotations

from pathlib import Path

# Which metrics each stage's figure shows, in panels: (panel title, [metric keys]).
PANELS = {
    "pretrain": [("loss", ["loss", "val_loss"])],
    "sft": [("loss", ["loss", "val_loss"])],
    "reward": [("loss", ["loss", "val_loss"]), ("pairwise accuracy", ["accuracy", "val_accuracy"]),
               ("reward margin", ["margin", "val_margin"])],
    "dpo": [("loss", ["loss", "val_loss"]), ("preference accuracy", ["accuracy", "val_accuracy"]),
            ("log-prob margin", ["logp_margin", "val_logp_margin"])],
    "rlhf": [("reward", ["reward/mean", "ground_truth/mean"]), ("KL to the reference", ["kl/mean"])],
}


def history(client, run_id: str, key: str) -> tuple[list[int], list[float]]:
    """The last value logged at each step (a resumed run logs its replayed steps again)."""
    points: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run_id, key):
        if m.step not in points or m.timestamp >= points[m.step][0]:
            points[m.step] = (m.timestamp, m.value)
    steps = sorted(points)
    return steps, [points[s][1] for s in steps]


def plot_stage(client, run_id: str, stage: str, path: Path) -> Path | None:
    """One PNG of ``stage``'s panels; None when the run logged none of their metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(title, [(key, *history(client, run_id, key)) for key in keys]) for title, keys in PANELS.get(stage, [])]
    panels = [(title, [c for c in curves if c[1]]) for title, curves in panels]
    panels = [(title, curves) for title, curves in panels if curves]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels):
        for key, steps, values in curves:
            ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=key)
        ax.set_title(f"{stage}: {title}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_lifecycle(client, stage_runs: dict[str, str], out_dir: Path) -> list[Path]:
    """A PNG per stage that has curves (``stage_runs``: stage -> MLflow run id)."""
    written = []
    for stage, run_id in stage_runs.items():
        path = plot_stage(client, run_id, stage, out_dir / f"{stage}.png")
        if path is not None:
            written.append(path)
    return written
