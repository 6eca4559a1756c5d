"""benchmarks/train_settings.py --smoke: one 4-step run of the real train stage script on 200 synthetic rows."""

from __future__ import annotations

ROWS, STEPS = 200, 4


def test_train_settings_smoke(run_benchmark, tmp_path):
    work = tmp_path / "work"
    figures, lines = run_benchmark(
        "train_settings", "--smoke", "--rows", str(ROWS), "--steps", str(STEPS), "--threads", "1", "--keep", str(work)
    )

    assert figures["rows"] == ROWS and figures["max_steps"] == STEPS
    assert figures["train_rows"] + figures["early_stop_rows"] <= ROWS and figures["train_rows"] > 0
    (run,) = figures["runs"]
    assert run["variant"] == "params.yaml" and run["threads"] == 1
    assert run["global_step"] == STEPS
    assert run["train_seconds"] > 0 and run["tokens_per_second"] > 0 and run["train_tokens"] > 0
    assert run["stage_wall_seconds"] >= run["train_seconds"]
    assert run["peak_memory_mb"] > 0
    assert run["eval_loss_final"] < run["eval_loss_initial"]  # 4 steps at lr 5e-3 already lower the answer loss
    curve = {int(step): loss for step, loss in run["eval_loss_curve"].items()}
    assert sorted(curve) == [0, 2, 4]  # an eval before training and every 2 steps (the smoke eval_steps)
    assert curve[0] == round(run["eval_loss_initial"], 3) and curve[STEPS] == round(run["eval_loss_final"], 3)
    assert len(lines) == 1 and "1 thread(s): 4 steps" in lines[0]
    # The stage ran in the work directory: its report and MLflow store are there, not in the repository.
    assert (work / "reports" / "train.json").is_file() and (work / "mlruns" / "mlflow.db").is_file()
