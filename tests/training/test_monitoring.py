"""Training health checks and history: symptom -> the seed's Common Issues fix; one CSV row per step."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from medlora.training.monitoring import (
    TrainingHealthError,
    TrainingMonitor,
    history_rows,
    is_overfitting,
    loss_problem,
    plot_losses,
    write_history,
)


@pytest.mark.parametrize(
    ("loss", "first", "expect"),
    [
        (float("nan"), 6.0, "not finite"),
        (float("inf"), 6.0, "not finite"),
        (61.0, 6.0, "exceeds train.loss_explosion_factor (10) x the first logged loss"),
        (59.0, 6.0, None),
        (3.0, None, None),
    ],
)
def test_loss_problem_maps_divergence_to_reducing_the_learning_rate(loss, first, expect):
    problem = loss_problem(loss, first, 10.0, 2e-3)
    if expect is None:
        assert problem is None
    else:
        assert expect in problem and "reduce train.learning_rate by 10x (now 0.002, try 0.0002)" in problem


def test_overfitting_needs_eval_up_while_train_down():
    trains = [(5, 3.0), (10, 2.5), (15, 2.0), (20, 1.5)]
    assert is_overfitting([(10, 2.0), (20, 2.2)], trains)
    assert not is_overfitting([(10, 2.0), (20, 1.9)], trains)  # eval still falling
    assert not is_overfitting([(10, 2.0), (20, 2.2)], [(5, 3.0), (10, 2.5), (20, 2.6)])  # train rising too
    assert not is_overfitting([(10, 2.0)], trains)


def state(step, log_history=()):
    return SimpleNamespace(
        global_step=step, max_steps=20, num_input_tokens_seen=step * 100, log_history=list(log_history)
    )


def test_monitor_warns_on_overfitting_and_stops_on_explosion(caplog):
    monitor = TrainingMonitor(learning_rate=1e-3, explosion_factor=10.0, log_to_mlflow=False)
    monitor.on_train_begin(None, state(0), None)
    control = SimpleNamespace()
    with caplog.at_level(logging.WARNING, logger="medlora.training.monitoring"):
        for step, logs in [(5, {"loss": 3.0}), (10, {"eval_loss": 2.0}), (15, {"loss": 2.0}), (20, {"eval_loss": 2.4})]:
            monitor.on_log(None, state(step), control, logs=logs)
    assert "overfitting" in caplog.text and "increase lora.lora_dropout" in caplog.text
    with pytest.raises(TrainingHealthError, match="training stopped at step 25: train_loss: loss 31 exceeds"):
        monitor.on_log(None, state(25), control, logs={"loss": 31.0})


def test_resumed_monitor_judges_explosion_against_the_original_first_loss():
    monitor = TrainingMonitor(learning_rate=1e-3, explosion_factor=10.0, log_to_mlflow=False)
    monitor.on_train_begin(None, state(40, [{"loss": 2.0, "step": 1}, {"loss": 1.0, "step": 40}]), None)
    with pytest.raises(TrainingHealthError):
        monitor.on_log(None, state(45), SimpleNamespace(), logs={"loss": 25.0})


def test_history_merges_train_and_eval_logs_by_step_and_plots(tmp_path):
    log_history = [
        {"eval_loss": 6.5, "step": 0},
        {"loss": 6.4, "learning_rate": 1e-3, "grad_norm": 3.0, "step": 1},
        {"loss": 5.0, "learning_rate": 2e-3, "grad_norm": 2.0, "step": 5},
        {"eval_loss": 4.9, "step": 5},
        {"train_runtime": 12.0, "step": 5},  # the end-of-training summary adds no row of its own
    ]
    rows = history_rows(log_history)
    assert [r["step"] for r in rows] == [0, 1, 5]
    assert rows[2] == {"step": 5, "train_loss": 5.0, "eval_loss": 4.9, "learning_rate": 2e-3, "grad_norm": 2.0}
    write_history(rows, tmp_path / "h.csv")
    assert (tmp_path / "h.csv").read_text().splitlines()[1] == "0,,6.5,,"
    plot_losses(rows, tmp_path / "plots" / "loss.png")
    assert (tmp_path / "plots" / "loss.png").read_bytes()[:4] == b"\x89PNG"
