"""Hyperparameter sweeps, one module per seam:

- ``spec``: what a caller submits and the validated spec (the search space, the fixed part);
- ``records``: a sweep and its trials as recorded, and their states;
- ``store``: their PostgreSQL tables and event log;
- ``orchestrator``: ``Sweeps``, which moves a sweep forward with Optuna (``advance``);
- ``parent_run``: the sweep's MLflow parent run.
"""
