"""Evaluators: user code that scores model outputs, run in a child process (runner.py)."""
