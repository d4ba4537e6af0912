"""The loss curve of a run as a PNG (with the reward curves of preference stages): people would rather look at a
curve than read numbers."""

from __future__ import annotations

import io
import json

from lmtuner_core.jobs.run_folder import RunDir

# Preference stages' reward metrics (metrics.jsonl keys -> labels), drawn under the loss when a run logs them.
REWARD_CURVES = {"rewards_accuracy": "reward accuracy (chosen > rejected)", "rewards_margin": "reward margin"}


def loss_curve_png(run: RunDir, title: str = "") -> bytes:
    """Training loss (and eval loss, if any) against step, from metrics.jsonl; for preference stages a second
    panel with the reward accuracy and margin. An empty run gives a plot that says so, not an error: the agent
    asked for a picture and gets one."""
    import matplotlib

    matplotlib.use("Agg")  # no display: render to memory
    from matplotlib import pyplot as plt

    train, evaluation = [], []
    rewards: dict[str, list] = {key: [] for key in REWARD_CURVES}
    if run.metrics.exists():
        for line in run.metrics.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("loss") is not None:
                train.append((record["step"], record["loss"]))
                for key, points in rewards.items():
                    if record.get(key) is not None:
                        points.append((record["step"], record[key]))
            if record.get("eval_loss") is not None:
                evaluation.append((record["step"], record["eval_loss"]))
    with_rewards = any(rewards.values())
    fig, axes = plt.subplots(2 if with_rewards else 1, 1, figsize=(6.4, 6.4 if with_rewards else 4.0), dpi=100,
                             sharex=True, squeeze=False)  # fmt: skip
    ax = axes[0][0]
    try:
        if train:
            ax.plot(*zip(*train, strict=True), label="training loss", color="#1f77b4")
        if evaluation:
            ax.plot(*zip(*evaluation, strict=True), "o-", label="eval loss", color="#d62728")
        if not train and not evaluation:
            ax.text(0.5, 0.5, "no loss logged yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(title or run.root.name)
        ax.grid(alpha=0.3)
        if train or evaluation:
            ax.legend()
        if with_rewards:
            low = axes[1][0]
            colors = iter(("#2ca02c", "#9467bd"))
            for key, points in rewards.items():
                if points:
                    low.plot(*zip(*points, strict=True), label=REWARD_CURVES[key], color=next(colors))
            low.set_xlabel("step")
            low.set_ylabel("reward")
            low.grid(alpha=0.3)
            low.legend()
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        return buffer.getvalue()
    finally:
        plt.close(fig)
