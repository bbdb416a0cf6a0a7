"""Users with email addresses, and the index items that point from an address to a user."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate, event


@dataclass
class EmailAddress:
    email_address: str
    is_verified: bool = False


class User(Aggregate):
    @event("Created")
    def __init__(self) -> None:
        self.email_addresses: dict[str, EmailAddress] = {}

    @event("EmailAddressAdded")
    def add_email_address(self, email_address: str) -> None:
        self.email_addresses[email_address] = EmailAddress(email_address)

    @event("EmailAddressVerified")
    def verify_email_address(self, email_address: str) -> None:
        self.email_addresses[email_address].is_verified = True


def uuid_from_email(email_address: str) -> UUID:
    return uuid5(NAMESPACE_URL, f"mailto:{email_address}")


class IndexItem(Aggregate):
    @staticmethod
    def create_id(email_address: str, **_: Any) -> UUID:
        return uuid_from_email(email_address)

    @event("Created")
    def __init__(self, email_address: str, index_value: UUID) -> None:
        self.email_address = email_address
        self.index_value = index_value

    @event("Updated")
    def update_index(self, index_value: UUID) -> None:
        self.index_value = index_value
