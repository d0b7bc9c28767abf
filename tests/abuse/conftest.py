"""The fault and abuse suite (issue 9): everything in this folder is marked `abuse`, so
`make test-abuse` (pytest -m abuse) runs it on its own; `make test` runs it with the rest.
Tests elsewhere that belong to it (the worker kill tests, the URL walk) carry the marker too."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.abuse)
