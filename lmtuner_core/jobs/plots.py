"""The loss curve of a run as a PNG: people would rather look at a curve than read numbers."""

from __future__ import annotations

import io
import json

from lmtuner_core.run import RunDir


def loss_curve_png(run: RunDir, title: str = "") -> bytes:
    """Training loss (and eval loss, if any) against step, from metrics.jsonl. An empty run gives a plot that
    says so, not an error: the agent asked for a picture and gets one."""
    import matplotlib

    matplotlib.use("Agg")  # no display: render to memory
    from matplotlib import pyplot as plt

    train, evaluation = [], []
    if run.metrics.exists():
        for line in run.metrics.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("loss") is not None:
                train.append((record["step"], record["loss"]))
            if record.get("eval_loss") is not None:
                evaluation.append((record["step"], record["eval_loss"]))
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
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
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        return buffer.getvalue()
    finally:
        plt.close(fig)
