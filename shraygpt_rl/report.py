"""Reports a person can read: a JSON file, a text table and a PNG plot.

The plot has the training curves of the online runs (``reward/mean`` and ``objective/kl``, read
from their TensorBoard logs) beside bars of each policy's held-out success and mean reward.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def latest_run(log_dir: str | Path) -> Path | None:
    """``log_dir`` itself if it holds event files, else its newest ``version_*`` folder."""
    log_dir = Path(log_dir)
    if any(log_dir.glob("events.out.tfevents*")):
        return log_dir
    versions = sorted(log_dir.glob("version_*"), key=lambda p: int(p.name.split("_")[-1]))
    return versions[-1] if versions else None


def read_scalars(run_dir: str | Path, tags: tuple[str, ...]) -> dict[str, tuple[list[int], list[float]]]:
    """``{tag: (steps, values)}`` of the scalar tags a TensorBoard run holds (absent tags left out)."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    present = set(events.Tags()["scalars"])
    out = {}
    for tag in tags:
        if tag in present:
            points = events.Scalars(tag)
            out[tag] = ([p.step for p in points], [p.value for p in points])
    return out


def write_json(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` points: online-RL rewards are noisy step to step."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_report(path: str | Path, runs: dict[str, str | Path], policies: dict[str, dict]) -> Path:
    """Write the PNG: held-out success and KL over training, bars per policy, reward per run.

    The top row has the runs' held-out success during training (``val/success``, the verifier's
    on the built-in tasks, so every run is on the same scale), their KL to the reference, and
    held-out bars per policy. The bottom row has each run's training reward on its own axis: the
    runs may optimise different rewards (a reward model, a verifier).

    Args:
        path: The PNG to write.
        runs: ``{label: TensorBoard log folder}`` of the online runs to draw curves for.
        policies: ``{label: evaluate_policy report}``; bars show ``success``, ``mean_reward`` and
            ``win_rate``.
    """
    curves = {}
    for label, log_dir in runs.items():
        run = latest_run(log_dir)
        curves[label] = read_scalars(run, ("reward/mean", "objective/kl", "val/success")) if run else {}
    rows = 2 if curves else 1
    fig, axes = plt.subplots(rows, 3, figsize=(15, 4.2 * rows), squeeze=False)
    success_ax, kl_ax, bar_ax = axes[0]
    for label, scalars in curves.items():
        per_rollout = _steps_per_rollout(scalars)
        for ax, tag in ((success_ax, "val/success"), (kl_ax, "objective/kl")):
            if tag in scalars:
                steps, values = scalars[tag]
                ax.plot(
                    [s / per_rollout for s in steps],
                    _smooth(values, 1 if tag == "val/success" else 5),
                    label=label,
                    marker="o" if len(values) < 20 else None,
                )
    success_ax.set(title="held-out success during training (val/success)", xlabel="rollout", ylim=(0, 1.02))
    kl_ax.set(title="KL to the reference per response (objective/kl)", xlabel="rollout", ylabel="nats")
    for ax in (success_ax, kl_ax):
        _finish(ax, "no run logged this")
    _bars(bar_ax, policies)
    if not curves:
        success_ax.set_visible(False)
        kl_ax.set_visible(False)
    for ax, (label, scalars) in zip(axes[1] if rows == 2 else [], curves.items()):
        if "reward/mean" in scalars:
            steps, values = scalars["reward/mean"]
            ax.plot(range(1, len(values) + 1), _smooth(values, max(len(values) // 40, 1)), color="tab:green")
        ax.set(title=f"{label}: training reward (reward/mean, smoothed)", xlabel="rollout", ylabel="reward")
        ax.grid(alpha=0.3)
    for ax in list(axes[1])[len(curves) :] if rows == 2 else []:
        ax.set_visible(False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _steps_per_rollout(scalars: dict) -> float:
    """Optimizer steps per rollout: ``reward/mean`` is logged once a rollout, at its first step."""
    steps = scalars.get("reward/mean", ([], []))[0]
    gaps = sorted(b - a for a, b in zip(steps, steps[1:]))
    return max(gaps[len(gaps) // 2], 1) if gaps else 1


def _finish(ax, empty: str) -> None:
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    else:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)


def _bars(ax, policies: dict[str, dict]) -> None:
    labels = list(policies)
    rule_rewards = sorted({m for p in labels for m in policies[p] if m.startswith("reward/")})  # --rewards' figures
    candidates = ("success", "mean_reward", "win_rate", *rule_rewards)
    metrics = [m for m in candidates if any(policies[p].get(m) is not None for p in labels)]
    width = 0.8 / max(len(metrics), 1)
    for i, metric in enumerate(metrics):
        values = [policies[p].get(metric) for p in labels]
        xs = [j + (i - (len(metrics) - 1) / 2) * width for j in range(len(labels))]
        bars = ax.bar(xs, [v if v is not None else math.nan for v in values], width, label=metric.replace("_", " "))
        ax.bar_label(bars, labels=[f"{v:.2f}" if v is not None else "" for v in values], fontsize=8)
    ax.set_xticks(range(len(labels)), labels)
    ax.axhline(0, color="black", linewidth=0.6)
    low = min([0.0] + [policies[p][m] for p in labels for m in metrics if policies[p].get(m) is not None])
    ax.set(title="held-out prompts, sampled at T = 1", ylim=(min(low - 0.1, 0), 1.3))
    if metrics:
        ax.legend(loc="upper left", ncol=len(metrics), fontsize=8)


def table(policies: dict[str, dict], columns: tuple[str, ...]) -> str:
    """A fixed-width text table: one row per policy, ``-`` where a figure does not apply."""
    names = [c.replace("_", " ") for c in columns]
    widths = [max(12, len(name) + 2) for name in names]  # a space between any two titles
    head = f"{'policy':<10}" + "".join(f"{name:>{w}}" for name, w in zip(names, widths))
    rows = [head, "-" * len(head)]
    for label, report in policies.items():
        cells = [report.get(c) for c in columns]
        rows.append(f"{label:<10}" + "".join(f"{'-' if v is None else f'{v:.3f}':>{w}}" for v, w in zip(cells, widths)))
    return "\n".join(rows)
