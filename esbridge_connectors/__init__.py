"""esbridge connectors: webhooks in, outbound calls, analytics feeds, SQL projections, replay.

Installed as ``esbridge_connectors`` (the ``connectors`` extra); each module is one
connector, built on the core ``esbridge`` packages.
"""
