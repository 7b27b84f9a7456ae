"""Model tests build tiny models once per session into an isolated cache folder (no hub, no user cache)."""

import pytest


@pytest.fixture(scope="session", autouse=True)
def isolated_model_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("RAU_CACHE", str(tmp_path_factory.mktemp("rau_cache")))
    yield
    mp.undo()
