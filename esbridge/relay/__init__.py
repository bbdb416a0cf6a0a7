"""Step 2 of the data flow: the relay, notification log → Kafka.

:class:`Relay` is the facade; the modules beside it are its parts: reading the
log (:mod:`.reader`), never publishing past a late commit (:mod:`.gaps`),
transactions of messages plus the relay's position (:mod:`.publisher`,
:mod:`.position`), one publishing relay per id (:mod:`.lease`,
:mod:`.standby`) and metrics (:mod:`.metrics`).
"""

from esbridge.relay.relay import Relay, RelayStatus

__all__ = ["Relay", "RelayStatus"]
