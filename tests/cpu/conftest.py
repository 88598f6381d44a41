"""The tiny random HF models of the model tests (``tests/models/conftest.py``), shared here: the CPU
training path is checked on the same models."""

from tests.models.conftest import tiny_models  # noqa: F401 (a fixture: found by its name)
