"""`python -m services.registry` starts the Registry service."""

from services.registry.server import main

main()
