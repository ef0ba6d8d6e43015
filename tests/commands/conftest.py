"""Fixtures the command tests share: the best checkpoint of the session's trained run, and its model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fmnist_tl.training import TransferClassifier


@pytest.fixture(scope="module")
def checkpoint(trained_run) -> Path:
    return Path(json.loads((trained_run / "metrics.json").read_text())["best_model_path"])


@pytest.fixture(scope="module")
def model(checkpoint) -> TransferClassifier:
    return TransferClassifier.from_checkpoint(checkpoint)
