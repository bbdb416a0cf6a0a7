"""The users application and the email index that follows it."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application, ProcessingEvent
from eventsourcing.dispatch import singledispatchmethod
from eventsourcing.system import ProcessApplication

from examples.email_index.domainmodel import IndexItem, User, uuid_from_email


class Users(Application[UUID]):
    def register_user(self) -> UUID:
        user = User()
        self.save(user)
        return user.id

    def add_email_address(self, user_id: UUID, email_address: str, verify: bool = False) -> None:
        user: User = self.repository.get(user_id)
        user.add_email_address(email_address)
        if verify:
            user.verify_email_address(email_address)
        self.save(user)

    def verify_email_address(self, user_id: UUID, email_address: str) -> None:
        user: User = self.repository.get(user_id)
        user.verify_email_address(email_address)
        self.save(user)

    def get_user(self, user_id: UUID) -> User:
        user: User = self.repository.get(user_id)
        return user


class EmailIndex(ProcessApplication[UUID]):
    @singledispatchmethod
    def policy(self, domain_event: Any, processing_event: ProcessingEvent[UUID]) -> None:
        """Other events do not change the index."""

    @policy.register(User.EmailAddressVerified)
    def _(self, domain_event: Any, processing_event: ProcessingEvent[UUID]) -> None:
        email_address = domain_event.email_address
        try:
            item: IndexItem = self.repository.get(uuid_from_email(email_address))
        except AggregateNotFoundError:
            item = IndexItem(email_address, index_value=domain_event.originator_id)
        else:
            item.update_index(domain_event.originator_id)
        processing_event.collect_events(item)

    def find_user(self, email_address: str) -> UUID | None:
        try:
            item: IndexItem = self.repository.get(uuid_from_email(email_address))
        except AggregateNotFoundError:
            return None
        return item.index_value
