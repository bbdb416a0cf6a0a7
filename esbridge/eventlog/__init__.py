"""Step 1 of the data flow: an application's notification log.

Reading it straight from the application's recorder (:mod:`.notification_log`)
and waking when new events are recorded (:mod:`.follower`). Both the relay and
a consumer that reconciles gaps read the log through here.
"""
