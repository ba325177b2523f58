"""The Training service: asynchronous training jobs on ARQ workers."""
