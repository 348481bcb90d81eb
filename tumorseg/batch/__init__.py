"""Many cases at once: discovery (cases.py) and the batch runner (runner.py)."""
