"""Fixtures of the harness's tests."""

from tests.support.dev_servers import start_dev_servers, tmpdir_for_servers

__all__ = ["start_dev_servers", "tmpdir_for_servers"]
