"""Deployments at run time: the control plane's operations (manager.py) over a backend that
runs each deployment's replicas (backend.py; embedded.py: engines of this process)."""
