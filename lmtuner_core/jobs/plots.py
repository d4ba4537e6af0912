"""The loss curve of a run as a PNG: people would rather look at a curve than read numbers."""

from __future__ import annotations

import io
import json

from lmtuner_core.run import RunDir

# Preference stages' reward metrics (metrics.jsonl keys -> labels), drawn in a panel under the loss when logged.
REWARD_CURVES = {"rewards_accuracy": "reward accuracy (chosen > rejected)", "rewards_margin": "reward margin"}


def loss_curve_png(run: RunDir, title: str = "") -> bytes:
    """Training loss (and eval loss, and GRPO's reward on a right-hand axis, if any) against step, from
    metrics.jsonl; for preference stages a second panel with the reward accuracy and margin. An empty run gives a
    plot that says so, not an error: the agent asked for a picture and gets one."""
    import matplotlib

    matplotlib.use("Agg")  # no display: render to memory
    from matplotlib import pyplot as plt

    train, evaluation, reward = [], [], []
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
            if record.get("reward_mean") is not None:
                reward.append((record["step"], record["reward_mean"], record.get("reward_std") or 0.0))
    with_rewards = any(rewards.values())
    fig, axes = plt.subplots(2 if with_rewards else 1, 1, figsize=(6.4, 6.4 if with_rewards else 4.0), dpi=100,
                             sharex=True, squeeze=False)  # fmt: skip
    ax = axes[0][0]
    try:
        if train:
            ax.plot(*zip(*train, strict=True), label="training loss", color="#1f77b4")
        if evaluation:
            ax.plot(*zip(*evaluation, strict=True), "o-", label="eval loss", color="#d62728")
        if not train and not evaluation and not reward:
            ax.text(0.5, 0.5, "no loss logged yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(title or run.root.name)
        ax.grid(alpha=0.3)
        handles = ax.get_legend_handles_labels()[0]
        if reward:  # GRPO: the graders' reward (mean, ± its spread) on a 0-1 axis of its own
            steps, means, spreads = zip(*reward, strict=True)
            right = ax.twinx()
            handles += right.plot(steps, means, label="reward (graders, mean)", color="#2ca02c")
            low = [max(0.0, m - s) for m, s in zip(means, spreads, strict=True)]
            high = [min(1.0, m + s) for m, s in zip(means, spreads, strict=True)]
            right.fill_between(steps, low, high, color="#2ca02c", alpha=0.15)
            right.set_ylim(0, 1)
            right.set_ylabel("reward")
        if handles:
            ax.legend(handles=handles, loc="best")
        if with_rewards:  # preference stages: TRL's reward accuracy and margin in a panel of their own
            low_ax = axes[1][0]
            colors = iter(("#2ca02c", "#9467bd"))
            for key, points in rewards.items():
                if points:
                    low_ax.plot(*zip(*points, strict=True), label=REWARD_CURVES[key], color=next(colors))
            low_ax.set_xlabel("step")
            low_ax.set_ylabel("reward")
            low_ax.grid(alpha=0.3)
            low_ax.legend()
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        return buffer.getvalue()
    finally:
        plt.close(fig)
