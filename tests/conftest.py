"""Shared test set-up: the repository root, and a guard that no test reaches a dataset hub."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Nothing may be downloaded at test time: make the Hugging Face libraries fail fast instead of trying the network.
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')


@pytest.fixture
def root() -> Path:
    return ROOT
