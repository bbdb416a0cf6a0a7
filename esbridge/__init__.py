"""esbridge: bridge event-sourced applications and Kafka, exactly once."""

from esbridge.errors import ConfigurationError, EsbridgeError, HarnessError, MessageFormatError

__all__ = ["ConfigurationError", "EsbridgeError", "HarnessError", "MessageFormatError"]
__version__ = "0.1.0"
