from pathlib import Path

import pytest

from samples.registry import SHIPPED_DIR


@pytest.fixture(scope="session")
def shipped() -> Path:
    return SHIPPED_DIR
