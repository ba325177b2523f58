"""The machine-learning core of the Training service: data, models, the training loop, MLflow.

Domain code only: nothing here knows gRPC, ARQ or Redis. ``catalog`` is torch-free so the
gRPC service can validate submissions without importing torch; the rest runs in the
training process the worker spawns.
"""
