"""`python -m services.training` starts the Training service (the worker is `.worker`)."""

from services.training.server import main

# Guarded: the dataset decoding pool spawns processes that import this module again.
if __name__ == "__main__":
    main()
