"""Fixtures: the real herald that the Rust test `clients::python_client_against_real_herald`
starts, read from the environment, and its history API to see what sockets receive."""

import os
import uuid

import httpx
import pytest


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.exit(
            f"{name} is not set: these tests run against a real herald; run them through "
            "`cargo test -p herald --test it clients`, which starts herald and sets it",
            returncode=2,
        )
    return value


@pytest.fixture(scope="session")
def herald_url() -> str:
    return _env("HERALD_URL")


@pytest.fixture(scope="session")
def api_key() -> str:
    return _env("HERALD_API_KEY")


@pytest.fixture
def user_id() -> str:
    return f"py-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def history(herald_url, api_key):
    """The messages of a channel, oldest first, as a socket resuming from 0 gets them."""

    def read(channel: str):
        response = httpx.get(
            f"{herald_url}/api/v1/channels/{channel}/history",
            params={"since": 0, "limit": 1000},
            headers={"Authorization": f"Bearer {api_key}"},
        )
        response.raise_for_status()
        return response.json()["messages"]

    return read
