"""Kafka itself, as every esbridge process meets it.

Client settings (:mod:`.config`), what Kafka's refusals mean (:mod:`.access`),
topics and the admin client (:mod:`.topics`), and which partition a key goes
to (:mod:`.partitioning`). Nothing here knows of relays or consumers.
"""
