"""Shared fixtures: the real configs composed and shrunk, and the project-built tiny pairs (fp32, CPU)."""

from __future__ import annotations

import os

# Before any HF import: without these every failed hub call retries for ~25 s (ENVIRONMENT.md).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

from bildexp.config import compose_config
from bildexp.config import Config
from bildexp.models import load_pair
from bildexp.tasks import load_task

torch.set_num_threads(1)


def make_config(*overrides: str) -> Config:
    """Compose the real conf/ with overrides, exactly as `bildexp run` does."""
    return compose_config(*overrides)


@pytest.fixture(scope="session", params=["tiny_t5", "tiny_llama"])
def pair_name(request) -> str:
    return request.param


_PAIRS: dict = {}


@pytest.fixture(scope="session")
def tiny_pair(pair_name):
    if pair_name not in _PAIRS:
        _PAIRS[pair_name] = load_pair(make_config(f"pair={pair_name}").pair)
    return _PAIRS[pair_name]


@pytest.fixture(scope="session")
def toy_examples():
    return load_task(make_config().task).examples

