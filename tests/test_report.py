"""The pipeline's picture (``reports/pipeline.png``): every panel drawn, titles that fit, every run in it.

Two fake online runs are written as TensorBoard scalars the way the stages log them: PPO with a
KL curve, GRPO without one (it trains with beta = 0), and the figure is checked through
matplotlib's own boxes rather than by looking at pixels.
"""

from itertools import combinations

import pytest
from torch.utils.tensorboard import SummaryWriter

from shraygpt_rl.report import plot_report, report_figure

STEPS_PER_ROLLOUT, ROLLOUTS = 4, 12
PASS_KEYS = ("pass@1", "pass@8", "maj@8")


def _write_run(folder, kl: bool, gain: float = 1.0) -> str:
    """A Lightning-like ``version_0`` folder: ``reward/mean`` once a rollout at its first step,
    ``objective/kl`` every step when the run has a KL term, ``val/success`` every other rollout."""
    writer = SummaryWriter(str(folder / "version_0"))
    for rollout in range(ROLLOUTS):
        step = rollout * STEPS_PER_ROLLOUT
        writer.add_scalar("reward/mean", -1 + gain * rollout / ROLLOUTS, step)
        if rollout % 2 == 0:
            writer.add_scalar("val/success", gain * rollout / ROLLOUTS / 2, step)
        for i in range(STEPS_PER_ROLLOUT if kl else 0):
            writer.add_scalar("objective/kl", 0.05 * (step + i), step + i)
    writer.close()
    return str(folder)


def _policy(success, kl, win_rate, passes=True) -> dict:
    """An ``evaluate_policy`` report as the pipeline keeps it, non-figures (``samples``) included."""
    report = {"success": success, "mean_reward": 2 * success - 1, "kl_to_reference": kl, "win_rate": win_rate}
    report.update(prompts=200, samples=[{"prompt": "1+1=", "response": "2"}], mean_length=5.0)
    if passes:
        report.update({"pass@1": success, "pass@8": min(2 * success, 1.0), "maj@8": success + 0.05})
    return report


def _policies(passes=True) -> dict:
    return {
        "SFT": _policy(0.30, 0.0, None, passes),  # the pipeline sets SFT's KL to itself to 0
        "PPO": _policy(0.45, 0.41, 0.62, passes),
        "GRPO": _policy(0.60, 0.93, 0.55, passes),
        "DPO": _policy(0.40, 0.25, 0.58, passes),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("logs")
    return {
        "PPO (reward model)": _write_run(root / "ppo", kl=True),
        "GRPO (reward functions)": _write_run(root / "grpo", kl=False, gain=1.5),
    }


def _legend_labels(ax) -> list[str]:
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend else []


def _assert_readable(fig) -> None:
    """Titles inside the figure and clear of each other; every axes visible and drawing something."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    width, height = fig.bbox.width, fig.bbox.height
    boxes = {}
    for ax in fig.axes:
        assert ax.get_visible(), f"hidden axes {ax.get_title()!r} leaves a blank slot"
        drawn = [line for line in ax.lines if len(line.get_xdata())] + list(ax.patches)
        assert drawn, f"axes {ax.get_title()!r} draws nothing"
        assert not any("no run logged" in t.get_text() for t in ax.texts), ax.get_title()
        assert ax.get_title(), "every panel says what it shows"
        box = ax.title.get_window_extent(renderer)
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height, ax.get_title()
        boxes[ax.get_title()] = box
    for (a, box_a), (b, box_b) in combinations(boxes.items(), 2):
        assert not box_a.overlaps(box_b), f"titles overlap: {a!r} and {b!r}"


def test_pipeline_figure_draws_every_panel_with_titles_that_fit(runs):
    fig = report_figure(runs, _policies())
    _assert_readable(fig)
    # the two runs' reward panels, success, KL, held-out bars and pass@k: six panels, no slot left over
    assert len(fig.axes) == 6


def test_kl_panel_shows_both_online_runs_and_their_held_out_kl(runs):
    policies = _policies()
    fig = report_figure(runs, policies)
    kl_axes = [ax for ax in fig.axes if "KL" in ax.get_title()]
    assert len(kl_axes) == 1
    ax = kl_axes[0]
    labels = _legend_labels(ax)
    assert any(label.startswith("PPO") for label in labels) and any(label.startswith("GRPO") for label in labels)
    # DPO has no rollouts to put a point at: named with its figure, no point drawn
    assert "DPO held-out: 0.25 (no run drawn)" in labels
    assert not [line for line in ax.lines if line.get_label().startswith("DPO") and len(line.get_xdata())]
    # GRPO logged no KL curve (beta = 0), yet its held-out KL to SFT is drawn, where its logs end
    # (in rollouts): PPO's KL curve runs to the last optimizer step, GRPO's logs to its last rollout
    ends = {"PPO": (ROLLOUTS * STEPS_PER_ROLLOUT - 1) / STEPS_PER_ROLLOUT, "GRPO": ROLLOUTS - 1}
    for name, run in (("PPO", "PPO (reward model)"), ("GRPO", "GRPO (reward functions)")):
        markers = [line for line in ax.lines if line.get_label().startswith(name) and "held-out" in line.get_label()]
        assert len(markers) == 1, name
        assert list(markers[0].get_ydata()) == [pytest.approx(policies[name]["kl_to_reference"])]
        assert list(markers[0].get_xdata()) == [pytest.approx(ends[name])]
        run_colors = {line.get_color() for a in fig.axes for line in a.lines if line.get_label() == run}
        assert run_colors == {markers[0].get_color()}, "a run keeps one colour across panels"


def test_pass_at_k_and_majority_are_drawn_when_reported(runs):
    fig = report_figure(runs, _policies())
    assert any(set(PASS_KEYS) <= set(_legend_labels(ax)) for ax in fig.axes)
    without = report_figure(runs, _policies(passes=False))
    assert not any("pass@1" in label for ax in without.axes for label in _legend_labels(ax))
    _assert_readable(without)


@pytest.mark.parametrize("passes", [True, False])
def test_no_runs_and_one_run_still_draw(runs, passes):
    """``--stage eval`` may pass no logs; a pipeline without GRPO has one run."""
    for chosen in ({}, {"PPO (reward model)": runs["PPO (reward model)"]}):
        fig = report_figure(chosen, _policies(passes))
        _assert_readable(fig)
        names = " ".join(ax.get_title() for ax in fig.axes)
        assert ("PPO (reward model)" in names) == bool(chosen) and "GRPO" not in names


def test_eval_shaped_input_and_the_png(tmp_path, runs):
    """``evaluate()`` names runs after their folders and its policies ``reference`` and ``policy``;
    ``plot_report`` still writes the PNG and returns its path."""
    policies = {"reference": {"success": 0.3, "kl_to_reference": None}, "policy": {"success": 0.5, "pass@1": None}}
    path = plot_report(tmp_path / "out" / "eval.png", {"ppo": runs["PPO (reward model)"]}, policies)
    assert path == tmp_path / "out" / "eval.png" and path.stat().st_size > 10_000
    _assert_readable(report_figure({"ppo": runs["PPO (reward model)"]}, policies))
