"""Test setup: eight simulated CPU devices, so that sharded code runs on a real mesh."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def shared_data_cache(tmp_path_factory):
    """One data cache for the session's train.py runs (tests/cli.py): a corpus's vocabulary
    and shards are made once, as on a user's machine, not once per test."""
    from cli import SHARED_CACHE

    os.environ[SHARED_CACHE] = str(tmp_path_factory.mktemp("data_cache"))
    yield
    os.environ.pop(SHARED_CACHE, None)


@pytest.fixture(scope="session")
def gcs():
    """One fake-gcs-server for the session, with the standard variables pointing every
    client of this process (and of the runs it starts) at it."""
    from gcs import GcsServer

    server = GcsServer()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()
