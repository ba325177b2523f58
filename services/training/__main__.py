"""`python -m services.training` starts the Training service (the worker is `.worker`)."""

from services.training.server import main

main()
