"""The Inference service: registry-aware model serving with batching and a Redis cache."""
