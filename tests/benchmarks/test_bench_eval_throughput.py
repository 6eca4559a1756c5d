"""benchmarks/eval_throughput.py on 8 questions: batch-size sweep and per-task lm-eval runs of the tiny adapter."""

from __future__ import annotations

QUESTIONS, SWEEP_QUESTIONS, BATCH_SIZES = 8, 4, (1, 4)
TASKS = ("medmcqa_local", "medmcqa_chat", "medmcqa_chat_loglik")  # params.yaml evaluate.tasks


def test_eval_throughput_smoke(run_benchmark, tmp_path):
    figures, table = run_benchmark(
        "eval_throughput",
        "--smoke",
        "--questions",
        str(QUESTIONS),
        "--sweep-questions",
        str(SWEEP_QUESTIONS),
        "--batch-sizes",
        *map(str, BATCH_SIZES),
        "--keep",
        str(tmp_path / "work"),
    )

    assert figures["questions"] == QUESTIONS
    assert figures["model"] == "adapter" and figures["source"] == "synthetic"
    assert figures["seconds"] > 0 and figures["questions_per_s"] > 0
    assert figures["batch_size"] in BATCH_SIZES

    sweep = figures["sweep"]
    assert sweep["questions"] == SWEEP_QUESTIONS and sweep["rounds"] == 1
    assert sorted(int(size) for size in sweep["by_batch_size"]) == list(BATCH_SIZES)
    assert all(entry["questions_per_s"] > 0 for entry in sweep["by_batch_size"].values())
    assert sweep["metrics_agree"] is True  # batching changes speed, never the scores

    assert set(figures["tasks"]) == set(TASKS)
    for task, entry in figures["tasks"].items():
        assert entry["questions"] == QUESTIONS, task
        assert entry["seconds"] > 0 and entry["questions_per_s"] > 0, task
        # the choice tasks score the four options of every question, the loglik task the correct answer only
        assert entry["requests"] == QUESTIONS * (1 if task == "medmcqa_chat_loglik" else 4), task
    for task in ("medmcqa_local", "medmcqa_chat"):
        assert 0 <= figures["tasks"][task]["metrics"]["acc"] <= 1
    assert figures["tasks"]["medmcqa_chat_loglik"]["metrics"]["answer_loglik"] < 0
    assert any(line.startswith("medmcqa_chat_loglik") for line in table)
