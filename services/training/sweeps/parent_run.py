"""A sweep's parent run in MLflow: opened with the space and the fixed parameters, closed
with the best trial, the figures and the best model registered; every trial is a child run.

Blocking (the MLflow client): the orchestration calls these in threads. torch is never
imported, so the Training service drives parent runs without loading it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from services.training.ml import search
from services.training.sweeps.records import TRIAL_RUNNING, TRIAL_STATES, Sweep, Trial


class ParentRuns:
    """Opens, ends and closes sweeps' parent runs on the MLflow server at ``tracking_uri``."""

    def __init__(self, tracking_uri: str) -> None:
        self._tracking_uri = tracking_uri

    def _tracker(self, run_id: str):
        from mlflow import MlflowClient

        from services.training.ml.tracking import RunTracker

        return RunTracker(MlflowClient(tracking_uri=self._tracking_uri), self._tracking_uri, run_id)

    def open(self, sweep: Sweep) -> str:
        from services.training.ml.tracking import RunTracker, sweep_run_name

        spec = sweep.spec
        tracker = RunTracker.open(
            self._tracking_uri,
            spec.base.experiment_name,
            sweep_run_name(spec.base.dataset, spec.strategy, spec.max_trials),
            {"mlmesh.sweep_id": sweep.sweep_id, "mlmesh.client": sweep.submitted_by},
        )
        stored = spec.to_json()
        space = stored["space"]
        # The hyperparameters every trial shares; the seed is the sweep's own param below.
        fixed = {
            f"fixed.{k}": v
            for k, v in spec.base.hyperparameters().items()
            if k not in spec.space and k != "seed"
        }
        tracker.log_params(
            {
                # The sampler's and every trial's seed; submitting it again repeats the sweep.
                "seed": spec.base.seed,
                "strategy": spec.strategy,
                "objective_metric": spec.objective_metric,
                "direction": spec.direction,
                "max_trials": spec.max_trials,
                "parallelism": spec.parallelism,
                "early_stopping": json.dumps(stored["pruner"]),
                "optuna_study": sweep.study_name,
                **{f"space.{name}": json.dumps(d) for name, d in space.items()},
                **fixed,
            }
        )
        with tempfile.TemporaryDirectory(prefix="mlmesh-sweep-") as tmp:
            (Path(tmp) / "search_space.json").write_text(json.dumps(space, indent=2) + "\n")
            tracker.log_artifacts(Path(tmp))
        return tracker.run_id

    def end(self, run_id: str, status: str) -> None:
        if run_id:
            self._tracker(run_id).end_quietly(status)

    def close(self, sweep: Sweep, best: Trial) -> int:
        """Log the best trial and the figures on the parent run, register the best trial's
        model (once, even when retried) and end the run."""
        from services.training.ml import sweep_report

        spec = sweep.spec
        tracker = self._tracker(sweep.mlflow_run_id)
        assert best.value is not None
        tracker.log_params({f"best.{k}": v for k, v in best.params.items()})
        tracker.log_metrics(
            {
                f"best_{spec.objective_metric}": best.value,
                **{f"best_{k}": v for k, v in best.metrics.items() if k.startswith("test_")},
                "trials": len(sweep.trials),
                **{
                    f"trials_{state}": sum(1 for t in sweep.trials if t.state == state)
                    for state in TRIAL_STATES
                    if state != TRIAL_RUNNING
                },
            },
            step=0,
        )
        tracker.client.set_tag(tracker.run_id, "mlmesh.best_trial", str(best.number))
        tracker.client.set_tag(tracker.run_id, "mlmesh.best_run_id", best.mlflow_run_id)
        points = [
            sweep_report.TrialPoint(t.number, t.state, t.value, t.params) for t in sweep.trials
        ]
        log_scale = {
            name: bool(getattr(domain, "log", False)) for name, domain in spec.space.items()
        }
        with tempfile.TemporaryDirectory(prefix="mlmesh-sweep-") as tmp:
            directory = Path(tmp)
            sweep_report.write_objective_by_trial(
                points,
                spec.objective_metric,
                spec.direction == search.MAXIMIZE,
                directory / sweep_report.OBJECTIVE_BY_TRIAL,
            )
            sweep_report.write_objective_by_parameter(
                points,
                spec.objective_metric,
                log_scale,
                directory / sweep_report.OBJECTIVE_BY_PARAMETER,
            )
            rows = [
                {
                    "number": t.number,
                    "state": t.state,
                    "value": t.value,
                    "params": t.params,
                    "epochs_completed": t.epochs_completed,
                    "mlflow_run_id": t.mlflow_run_id,
                    "test_accuracy": t.metrics.get("test_accuracy"),
                }
                for t in sweep.trials
            ]
            (directory / "trials.json").write_text(json.dumps(rows, indent=2) + "\n")
            tracker.log_artifacts(directory)
        model_name = spec.base.model_name
        registered = tracker.client.search_model_versions(
            f"name = '{model_name}' and run_id = '{best.mlflow_run_id}'"
        )
        mine = [v for v in registered if v.tags.get("mlmesh.sweep_id") == sweep.sweep_id]
        if mine:
            version = int(mine[0].version)
        else:
            version = tracker.register(
                best.model_uri,
                model_name,
                {
                    "mlmesh.sweep_id": sweep.sweep_id,
                    "mlmesh.job_id": best.job_id,
                    "mlmesh.trial_number": str(best.number),
                },
            )
        tracker.end("FINISHED")
        return version
