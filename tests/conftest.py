"""Shared pytest fixtures: the local Hub-compatible server (tests/hub_server.py)."""

from hub_server import local_hub  # noqa: F401
