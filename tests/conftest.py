"""Shared fixtures: tiny random models built in code, no downloads."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_config():
    from radixpert.config import get_config

    return get_config("tiny")


@pytest.fixture()
def tiny_model(tiny_config):
    from radixpert.model import build_model

    return build_model(tiny_config)
