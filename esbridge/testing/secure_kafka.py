"""A Kafka broker that authenticates (SASL/SCRAM over TLS) and authorises (ACLs).

For tests of what a client without the right credentials or permissions
sees. A :class:`~esbridge.testing.local_kafka.LocalKafkaBroker` (the jars
and Java the harness already uses) with one client listener, ``SASL_SSL``
on 127.0.0.1, whose certificate is signed by a CA made at start-up
(:mod:`esbridge.testing.tls`), and the ``StandardAuthorizer``: a principal
may do only what an ACL allows. The harness itself is the super user
``admin`` (created with the storage, before the broker first starts).

The controller listener stays plaintext on 127.0.0.1 for the broker's own
use (its principal, ``User:ANONYMOUS``, is a super user as KRaft requires);
clients use :attr:`bootstrap_servers`, the ``SASL_SSL`` listener.

Tests add users and ACLs::

    def test_reader(secure_kafka_broker):
        broker = secure_kafka_broker
        user = broker.add_user()                      # a new user, its password
        topic = broker.create_topic()
        broker.allow(user.name, "topic", topic, "READ")
        broker.allow(user.name, "group", "my-group", "READ")
        Consumer(broker.user_config(user) | {"group.id": "my-group"})
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esbridge.errors import HarnessError
from esbridge.kafka.topics import kafka_admin
from esbridge.testing.local_kafka import LocalKafkaBroker
from esbridge.testing.servers import free_port, unique_name
from esbridge.testing.tls import BrokerTLS, make_broker_tls

ADMIN = "admin"
MECHANISM = "SCRAM-SHA-512"


@dataclass(frozen=True)
class KafkaUser:
    """A SCRAM user of the secure broker (``principal`` is what ACLs name)."""

    name: str
    password: str

    @property
    def principal(self) -> str:
        return f"User:{self.name}"


def _properties(
    port: int, controller_port: int, tls: BrokerTLS, admin_password: str
) -> dict[str, str]:
    jaas = (
        "org.apache.kafka.common.security.scram.ScramLoginModule required "
        f'username="{ADMIN}" password="{admin_password}";'
    )
    return {
        "listeners": f"SASL_SSL://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"SASL_SSL://127.0.0.1:{port}",
        "listener.security.protocol.map": "SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT",
        "inter.broker.listener.name": "SASL_SSL",
        "sasl.enabled.mechanisms": MECHANISM,
        "sasl.mechanism.inter.broker.protocol": MECHANISM,
        f"listener.name.sasl_ssl.{MECHANISM.lower()}.sasl.jaas.config": jaas,
        "ssl.keystore.type": "PKCS12",
        "ssl.keystore.location": str(tls.keystore),
        "ssl.keystore.password": tls.password,
        "ssl.key.password": tls.password,
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(tls.ca_file),
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "super.users": f"User:{ADMIN};User:ANONYMOUS",
        "allow.everyone.if.no.acl.found": "false",
    }


class SecureKafkaBroker(LocalKafkaBroker):
    """A single-node KRaft broker with SASL/SCRAM-SHA-512 over TLS and ACLs, on 127.0.0.1.

    :meth:`config` gives the super user's settings (the harness's own
    clients: topics, users, ACLs); :meth:`user_config` and :meth:`user_env`
    those of a user made with :meth:`add_user`. :attr:`ca_file` is the CA to
    trust.
    """

    backend = "local, SASL_SSL + ACLs"

    def __init__(self, heap: str = "512m") -> None:
        self.admin_password = secrets.token_hex(12)
        tls_password = secrets.token_hex(12)
        ports = (free_port(), free_port())
        self.tls_dir = Path(tempfile.mkdtemp(prefix="esbridge-kafka-tls-"))
        try:
            self.tls = make_broker_tls(self.tls_dir, tls_password)
            super().__init__(
                heap=heap,
                internal_partitions=2,
                ports=ports,
                properties=_properties(*ports, self.tls, self.admin_password),
                storage_args=(
                    "--add-scram",
                    f"{MECHANISM}=[name={ADMIN},password={self.admin_password}]",
                ),
            )
        except BaseException:
            shutil.rmtree(self.tls_dir, ignore_errors=True)
            raise

    @property
    def ca_file(self) -> Path:
        return self.tls.ca_file

    # -- client settings --------------------------------------------------

    def config(self, **overrides: Any) -> dict[str, Any]:
        """The super user's librdkafka settings (``overrides`` win)."""
        conf = self.user_config(KafkaUser(ADMIN, self.admin_password))
        conf.update(overrides)
        return conf

    def user_config(self, user: KafkaUser, **overrides: Any) -> dict[str, Any]:
        """librdkafka settings of ``user``: SASL_SSL, SCRAM-SHA-512, trusting :attr:`ca_file`."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": "SASL_SSL",
            "sasl.mechanism": MECHANISM,
            "sasl.username": user.name,
            "sasl.password": user.password,
            "ssl.ca.location": str(self.ca_file),
        }
        conf.update(overrides)
        return conf

    def user_env(self, user: KafkaUser, **overrides: Any) -> dict[str, str]:
        """``KAFKA_*`` variables for an ``esbridge`` command run as ``user``."""
        conf = self.user_config(user, **overrides)
        return {"KAFKA_" + key.upper().replace(".", "_"): str(v) for key, v in conf.items()}

    # -- users and ACLs ---------------------------------------------------

    def add_user(self, name: str | None = None, password: str | None = None) -> KafkaUser:
        """A new SCRAM user (unique name and random password unless given), usable at once."""
        from confluent_kafka.admin import (
            ScramCredentialInfo,
            ScramMechanism,
            UserScramCredentialUpsertion,
        )

        user = KafkaUser(name or unique_name("user"), password or secrets.token_hex(12))
        info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192)
        upsert = UserScramCredentialUpsertion(user.name, info, user.password.encode())
        with self._admin() as admin:
            futures = admin.alter_user_scram_credentials([upsert])
            futures[user.name].result(30)
        self._wait_until_authenticates(user)
        return user

    def allow(
        self, user: str | KafkaUser, resource_type: str, name: str, *operations: str,
        prefixed: bool = False,
    ) -> None:  # fmt: skip
        """Add ACLs: ``user`` may do ``operations`` on resource ``resource_type`` ``name``.

        ``resource_type``: ``topic``, ``group``, ``transactional_id`` or
        ``cluster`` (``name`` ``kafka-cluster``); ``operations``: ``READ``,
        ``WRITE``, ``DESCRIBE``, ``CREATE``, ...; ``prefixed``: ``name`` is a
        prefix. Returns once the broker enforces them.
        """
        from confluent_kafka.admin import AclBinding

        bindings = _bindings(AclBinding, user, resource_type, name, operations, prefixed)
        with self._admin() as admin:
            for future in admin.create_acls(bindings, request_timeout=30).values():
                future.result(30)
        time.sleep(0.2)  # one node: ACLs apply once the metadata log is replayed (ms)

    def revoke(
        self, user: str | KafkaUser, resource_type: str, name: str, *operations: str,
        prefixed: bool = False,
    ) -> None:  # fmt: skip
        """Remove ACLs that :meth:`allow` added (same arguments)."""
        from confluent_kafka.admin import AclBindingFilter

        filters = _bindings(AclBindingFilter, user, resource_type, name, operations, prefixed)
        with self._admin() as admin:
            for future in admin.delete_acls(filters, request_timeout=30).values():
                future.result(30)
        time.sleep(0.2)

    def _admin(self) -> Any:
        return kafka_admin(self.config())

    def _wait_until_authenticates(self, user: KafkaUser, timeout: float = 30.0) -> None:
        """SCRAM credentials reach the listener through the metadata log: wait for them."""
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + timeout
        admin = AdminClient(self.user_config(user, **{"error_cb": lambda error: None}))
        while True:
            try:
                admin.list_topics(timeout=2)
                return
            except KafkaException as e:
                if time.monotonic() > deadline:
                    raise HarnessError(
                        f"user {user.name!r} cannot log in after {timeout} s: {e}"
                    ) from e
                time.sleep(0.2)

    def close(self) -> None:
        try:
            super().close()
        finally:
            shutil.rmtree(self.tls_dir, ignore_errors=True)


def _bindings(
    kind: Any,
    user: str | KafkaUser,
    resource_type: str,
    name: str,
    operations: tuple[str, ...],
    prefixed: bool,
) -> list[Any]:
    """ALLOW ACL bindings (or filters matching them) of ``user`` on one resource."""
    from confluent_kafka.admin import (
        AclOperation,
        AclPermissionType,
        ResourcePatternType,
        ResourceType,
    )

    principal = user.principal if isinstance(user, KafkaUser) else f"User:{user}"
    pattern = ResourcePatternType.PREFIXED if prefixed else ResourcePatternType.LITERAL
    return [
        kind(
            ResourceType[resource_type.upper()],
            name,
            pattern,
            principal,
            "*",
            AclOperation[operation.upper()],
            AclPermissionType.ALLOW,
        )
        for operation in operations
    ]
