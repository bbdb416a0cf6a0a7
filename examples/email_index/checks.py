"""The seed's email-index assertions against any started runner."""

from __future__ import annotations

from collections.abc import Callable

from eventsourcing.system import Runner

from examples.email_index.application import EmailIndex, Users
from examples.email_index.domainmodel import uuid_from_email


def check_email_index(runner: Runner, settle: Callable[[], None] = lambda: None) -> None:
    users = runner.get(Users)
    index = runner.get(EmailIndex)

    user1 = users.register_user()
    settle()
    assert user1 in users.repository
    assert user1 not in index.repository

    users.add_email_address(user1, "me@example.com")
    settle()
    assert not users.get_user(user1).email_addresses["me@example.com"].is_verified
    index_key = uuid_from_email("me@example.com")
    assert index_key not in index.repository
    assert index.find_user("me@example.com") is None

    users.verify_email_address(user1, "me@example.com")
    settle()
    assert users.get_user(user1).email_addresses["me@example.com"].is_verified
    assert index_key in index.repository
    assert index.find_user("me@example.com") == user1

    # Adding and verifying the same address again keeps the index right.
    users.add_email_address(user1, "me@example.com", verify=True)
    settle()
    assert index.find_user("me@example.com") == user1

    assert uuid_from_email("mycat@example.com") not in index.repository
    users.add_email_address(user1, "mycat@example.com", verify=True)
    settle()
    assert uuid_from_email("mycat@example.com") in index.repository

    # A second user who verifies the same address takes the index entry over.
    user2 = users.register_user()
    users.add_email_address(user2, "mycat@example.com", verify=True)
    settle()
    assert index.find_user("mycat@example.com") == user2
    assert index.find_user("me@example.com") == user1

    # The index holds index items only, never users.
    assert user1 in users.repository
    assert user1 not in index.repository
