"""Step 2 of the data flow: the relay, notification log → Kafka.

:class:`Relay` is the facade (:mod:`.relay`: configuration, set-up, status);
the modules beside it are its parts: publishing payloads or prompts, two
strategies of one protocol (:mod:`.strategy`, :mod:`.payloads`,
:mod:`.prompts`), the loop that retries through outages while holding the
lease (:mod:`.loop`), reading the log (:mod:`.reader`), never publishing past
a late commit (:mod:`.gaps`), transactions of messages plus the relay's
position (:mod:`.publisher`, :mod:`.position`), one publishing relay per id
(:mod:`.lease`, :mod:`.standby`), settings (:mod:`.tuning`), progress and
status (:mod:`.status`) and metrics (:mod:`.metrics`).
"""

from esbridge.relay.relay import Relay, RelayStatus

__all__ = ["Relay", "RelayStatus"]
