"""esbridge: bridge event-sourced applications and Kafka, exactly once.

The public API, one name per step of the data flow: a :class:`Relay` publishes
an application's notification log to Kafka; a :class:`ConsumerAdapter` feeds a
topic into a downstream process application; a :class:`KafkaRunner` runs a
whole ``eventsourcing`` ``System`` that way. The test harness is the pytest
plugin in :mod:`esbridge.testing`; connectors live in ``esbridge_connectors``.
"""

from esbridge.consumer.adapter import ConsumerAdapter, ConsumerStatus
from esbridge.deadletters.policy import DeadLetterPolicy
from esbridge.errors import (
    ApplicationNotFoundError,
    BrokerUnavailable,
    BrokerUnavailableError,
    CausalDependencyTimeoutError,
    ConfigurationError,
    ConsumerError,
    EsbridgeError,
    GapNotReconciledError,
    HarnessError,
    KafkaAuthenticationError,
    KafkaAuthorizationError,
    KafkaTLSError,
    MessageFormatError,
    PoisonMessageError,
    PostgresUnavailableError,
    RelayError,
    RelayFencedError,
    RelayIdConflictError,
    RelayPositionError,
    RelayStandbyError,
    SchemaIncompatibleError,
    SchemaNotRegisteredError,
    SchemaRegistryUnavailableError,
    ServerUnavailableError,
    SystemConfigurationError,
    SystemRunnerError,
    UpstreamMismatchError,
)
from esbridge.names import tracking_names
from esbridge.processing.recorder_hook import record_trace_context
from esbridge.relay.relay import Relay, RelayStatus
from esbridge.system.runner import KafkaRunner

__all__ = [
    "ApplicationNotFoundError",
    "BrokerUnavailable",
    "BrokerUnavailableError",
    "CausalDependencyTimeoutError",
    "ConfigurationError",
    "ConsumerAdapter",
    "ConsumerError",
    "ConsumerStatus",
    "DeadLetterPolicy",
    "EsbridgeError",
    "GapNotReconciledError",
    "HarnessError",
    "KafkaAuthenticationError",
    "KafkaAuthorizationError",
    "KafkaRunner",
    "KafkaTLSError",
    "MessageFormatError",
    "PoisonMessageError",
    "PostgresUnavailableError",
    "Relay",
    "RelayError",
    "RelayFencedError",
    "RelayIdConflictError",
    "RelayPositionError",
    "RelayStandbyError",
    "RelayStatus",
    "SchemaIncompatibleError",
    "SchemaNotRegisteredError",
    "SchemaRegistryUnavailableError",
    "ServerUnavailableError",
    "SystemConfigurationError",
    "SystemRunnerError",
    "UpstreamMismatchError",
    "record_trace_context",
    "tracking_names",
]
__version__ = "0.1.0"
