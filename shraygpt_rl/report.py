"""Reports a person can read: a JSON file, a text table and a PNG plot.

The plot (``report_figure``, saved by ``plot_report``) has the training curves of the online runs
(``val/success``, ``objective/kl`` and ``reward/mean``, read from their TensorBoard logs), each
run's held-out KL to the reference, and bars of each policy's held-out figures and, when
reported, its pass@1, pass@k and maj@k. It is drawn on a plain Agg ``Figure``, not through pyplot,
so nothing needs a display or closing.
"""

from __future__ import annotations

import json
import math
import re
from functools import partial
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


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
    """Write the PNG of ``report_figure``.

    Args:
        path: The PNG to write; its folder is made if need be.
        runs: ``{label: TensorBoard log folder}`` of the online runs to draw curves for.
        policies: ``{label: evaluate_policy report}``.

    Returns:
        ``path``, as a ``Path``.
    """
    fig = report_figure(runs, policies)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def report_figure(runs: dict[str, str | Path], policies: dict[str, dict]) -> Figure:
    """The report's figure: one panel per thing there is to show, laid out with no slot left blank.

    The panels, each only when something feeds it: the runs' held-out success during training
    (``val/success``, the verifier's on the built-in tasks, so every run is on the same scale);
    their KL to the reference (``objective/kl`` where logged, and a star at each run's last
    rollout for its policy's held-out ``kl_to_reference``); bars per policy of the held-out
    figures; each run's training reward on its own axis (the runs may optimise different rewards,
    a reward model, a verifier); bars per policy of pass@1, pass@k and maj@k when reported.

    A run is matched to its policy by the label before `` (``: ``"PPO (reward model)"`` to
    ``"PPO"``. Policies with a held-out KL but no run (DPO trains offline: there is no rollout to
    put its figure at) are named in the KL panel's legend with their figure, without a point.

    Args:
        runs: ``{label: TensorBoard log folder}`` of the online runs to draw curves for; may be
            empty (``--stage eval`` without ``--logs``).
        policies: ``{label: evaluate_policy report}``; the bars show ``success``, ``mean_reward``,
            ``win_rate`` and ``reward/*``, and ``pass@*`` and ``maj@*`` in a panel of their own.

    Returns:
        The figure, on an Agg canvas and outside pyplot's figure list (nothing to close).
    """
    curves = {}
    for label, log_dir in runs.items():
        run = latest_run(log_dir)
        curves[label] = read_scalars(run, ("reward/mean", "objective/kl", "val/success")) if run else {}
    colors = {label: f"C{i}" for i, label in enumerate(curves)}  # a run keeps its colour in every panel
    panels = []
    if any("val/success" in scalars for scalars in curves.values()):
        panels.append(partial(_success_panel, curves=curves, colors=colors))
    if any("objective/kl" in s for s in curves.values()) or any(_run_kl(label, policies) for label in curves):
        panels.append(partial(_kl_panel, curves=curves, colors=colors, policies=policies))
    panels.append(partial(_bars, policies=policies))
    for label, scalars in curves.items():
        if "reward/mean" in scalars:
            panels.append(partial(_reward_panel, label=label, scalars=scalars, color=colors[label]))
    if _pass_metrics(policies):
        panels.append(partial(_pass_panel, policies=policies))
    fig, axes = _grid(len(panels))
    for ax, draw in zip(axes, panels):
        draw(ax)
    return fig


def _grid(count: int) -> tuple[Figure, list]:
    """A figure with exactly ``count`` axes: rows of up to 3 (2 for 4 panels), the last row's
    panels widened to fill it, so no slot is left blank."""
    ncols = count if count <= 3 else 2 if count == 4 else 3
    rows = math.ceil(count / ncols)
    per_row = [ncols] * (rows - 1) + [count - ncols * (rows - 1)]
    units = math.lcm(*per_row)  # grid columns every row divides evenly
    fig = Figure(figsize=(5.2 * ncols, 4.4 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(rows, units)
    axes = []
    for row, n in enumerate(per_row):
        span = units // n
        axes += [fig.add_subplot(grid[row, i * span : (i + 1) * span]) for i in range(n)]
    return fig, axes


def _rollouts(scalars: dict, tag: str) -> tuple[list[float], list[float]]:
    """A tag's points against the rollout they were logged in (steps over steps per rollout)."""
    steps, values = scalars[tag]
    per_rollout = _steps_per_rollout(scalars)
    return [s / per_rollout for s in steps], values


def _steps_per_rollout(scalars: dict) -> float:
    """Optimizer steps per rollout: ``reward/mean`` is logged once a rollout, at its first step."""
    steps = scalars.get("reward/mean", ([], []))[0]
    gaps = sorted(b - a for a, b in zip(steps, steps[1:]))
    return max(gaps[len(gaps) // 2], 1) if gaps else 1


def _run_kl(label: str, policies: dict[str, dict]) -> tuple[str, float] | None:
    """``(policy, kl_to_reference)`` of the policy a run trained, if it has a held-out KL."""
    name = label.split(" (")[0]
    kl = policies.get(name, {}).get("kl_to_reference")
    return (name, kl) if kl is not None else None


def _success_panel(ax: Axes, curves: dict[str, dict], colors: dict[str, str]) -> None:
    for label, scalars in curves.items():
        if "val/success" in scalars:
            xs, values = _rollouts(scalars, "val/success")
            ax.plot(xs, values, color=colors[label], label=label, marker="o" if len(values) < 20 else None)
    ax.set(title="held-out success during training\n(val/success)", xlabel="rollout", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _kl_panel(ax: Axes, curves: dict[str, dict], colors: dict[str, str], policies: dict[str, dict]) -> None:
    """KL curves where logged, and every run's held-out KL as a star where its training ends: a run
    without a KL term (GRPO at beta = 0) logs no curve but still drifts from the reference."""
    trained = set()
    for label, scalars in curves.items():
        if "objective/kl" in scalars:
            xs, values = _rollouts(scalars, "objective/kl")
            ax.plot(xs, _smooth(values, 5), color=colors[label], label=label)
        held_out = _run_kl(label, policies)
        if held_out:
            name, kl = held_out
            trained.add(name)
            # where the run's logs end: its policy was exported after its last rollout
            ends = [x for tag in scalars for x in _rollouts(scalars, tag)[0][-1:]]
            star = dict(marker="*", markersize=14, markeredgecolor="black", linestyle="none", color=colors[label])
            ax.plot([max(ends, default=0.0)], [kl], label=f"{name} held-out: {kl:.2f}", **star)
    for name, report in policies.items():
        kl = report.get("kl_to_reference")
        # the reference itself (SFT in the pipeline) is 0 by construction: nothing to say
        if name not in trained and kl:
            ax.plot([], [], linestyle="none", label=f"{name} held-out: {kl:.2f} (no run drawn)")
    title = "KL to the reference per response\n(curve: objective/kl; star: held out)"
    ax.set(title=title, xlabel="rollout", ylabel="nats")
    # from rollout 0 and KL 0 up, so a panel of stars alone still reads as drift from the start
    ax.set_xlim(left=min(0, ax.get_xlim()[0]))
    ax.set_ylim(bottom=min(0, ax.get_ylim()[0]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _reward_panel(ax: Axes, label: str, scalars: dict, color: str) -> None:
    xs, values = _rollouts(scalars, "reward/mean")
    ax.plot(xs, _smooth(values, max(len(values) // 40, 1)), color=color, label=label)
    ax.set(title=f"{label}\ntraining reward (reward/mean, smoothed)", xlabel="rollout", ylabel="reward")
    ax.grid(alpha=0.3)


def _bars(ax: Axes, policies: dict[str, dict]) -> None:
    """Held-out figures per policy: the verifier's, the reward model's win rate, ``--rewards``'."""
    labels = list(policies)
    rule_rewards = sorted({m for p in labels for m in policies[p] if m.startswith("reward/")})
    candidates = ("success", "mean_reward", "win_rate", *rule_rewards)
    metrics = [m for m in candidates if any(policies[p].get(m) is not None for p in labels)]
    _grouped_bars(ax, policies, labels, metrics)
    ax.set_title("held-out prompts, sampled at T = 1")
    if not metrics:
        ax.text(0.5, 0.5, "no held-out figures", ha="center", va="center", transform=ax.transAxes)


def _pass_metrics(policies: dict[str, dict]) -> list[str]:
    """The ``pass@n`` and ``maj@n`` keys some policy has a figure for: pass@ first, by n."""
    keys = {k for r in policies.values() for k, v in r.items() if v is not None and re.fullmatch(r"(pass|maj)@\d+", k)}
    return sorted(keys, key=lambda k: (k.startswith("maj"), int(k.split("@")[1])))


def _pass_panel(ax: Axes, policies: dict[str, dict]) -> None:
    metrics = _pass_metrics(policies)
    labels = [p for p in policies if any(policies[p].get(m) is not None for m in metrics)]
    _grouped_bars(ax, policies, labels, metrics)
    k = max(int(m.split("@")[1]) for m in metrics)
    ax.set_title(f"held-out {', '.join(metrics)}\n({k} samples per prompt)")


def _grouped_bars(ax: Axes, policies: dict[str, dict], labels: list[str], metrics: list[str]) -> None:
    """One group of bars per policy, one bar per metric, each with its figure on top (none where
    a policy has no figure); headroom above 1 keeps the legend off the bars."""
    width = 0.8 / max(len(metrics), 1)
    for i, metric in enumerate(metrics):
        values = [policies[p].get(metric) for p in labels]
        xs = [j + (i - (len(metrics) - 1) / 2) * width for j in range(len(labels))]
        bars = ax.bar(xs, [v if v is not None else math.nan for v in values], width, label=metric.replace("_", " "))
        ax.bar_label(bars, labels=[f"{v:.2f}" if v is not None else "" for v in values], fontsize=8)
    ax.set_xticks(range(len(labels)), labels)
    ax.axhline(0, color="black", linewidth=0.6)
    low = min([0.0] + [policies[p][m] for p in labels for m in metrics if policies[p].get(m) is not None])
    ax.set_ylim(min(low - 0.1, 0), 1.3)
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
