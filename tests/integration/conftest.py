"""Every test under tests/integration is marked ``integration``: they start real Ray clusters, Serve apps, CLI
subprocesses or a browser. ``make test-unit`` (``pytest tests/unit -m "not integration"``) runs the rest."""

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(item.fspath).resolve().parents:
            item.add_marker(pytest.mark.integration)
