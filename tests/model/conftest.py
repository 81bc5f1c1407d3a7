"""Fixtures for the model tests: the real default model, loaded once per session per mode."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# pytest runs with --import-mode=importlib: make model_helpers importable by the tests here.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def default_reference():
    from girandole.model.loader import load_model

    return load_model(None, mode="reference", device="cpu")


@pytest.fixture(scope="session")
def default_fast():
    from girandole.model.loader import load_model

    return load_model(None, mode="fast", device="cpu")
