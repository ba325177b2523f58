"""The launcher: runs the whole mesh on one machine, the way `make up` does.

`services.launcher.mesh.Mesh` is the API; `python -m services.launcher up` the command.
Kept free of imports so the watchdog process (`python -m services.launcher.watchdog`) starts light.
"""
