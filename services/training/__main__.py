"""`python -m services.training` starts the Training service (the worker is `.worker`)."""

# Guarded, and the import inside: the dataset decoding pool spawns processes that import this
# module again, and they need none of the server.
if __name__ == "__main__":
    from services.training.server import main

    main()
