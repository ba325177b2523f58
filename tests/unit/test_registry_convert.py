"""MLflow entities to mlmesh.registry.v1 messages."""

from __future__ import annotations

from mlflow.entities import Metric, Param, Run, RunData, RunInfo

from services.registry import convert


def test_a_runs_latest_metrics_keep_their_step_and_time() -> None:
    info = RunInfo(
        run_id="r1",
        experiment_id="1",
        user_id="u",
        status="FINISHED",
        start_time=1_700_000_000_000,
        end_time=1_700_000_060_000,
        lifecycle_stage="active",
        run_name="cnn-mnist-adam-lr0.001-bs128-e2",
    )
    data = RunData(
        metrics=[
            Metric("val_accuracy", 0.97, 1_700_000_050_000, 2),
            Metric("test_accuracy", 0.96, 1_700_000_055_000, 2),
            Metric("epoch_seconds", 4.5, 1_700_000_049_000, 2),
        ],
        params=[Param("epochs", "2")],
    )
    run = convert.run(Run(info, data))
    metrics = {m.key: m for m in run.metrics}
    assert [m.key for m in run.metrics] == ["epoch_seconds", "test_accuracy", "val_accuracy"]
    assert metrics["val_accuracy"].step == 2
    assert metrics["val_accuracy"].value == 0.97
    assert metrics["val_accuracy"].time.ToMilliseconds() == 1_700_000_050_000
    assert run.run_name == "cnn-mnist-adam-lr0.001-bs128-e2"
