"""What every long-running esbridge process needs, beside the data flow.

Logging (:mod:`.logs`), Prometheus metrics (:mod:`.metrics`), graceful stop
on signals (:mod:`.signals`), refusing storage other than Postgres at start
(:mod:`.persistence`), waiting out a Postgres outage
(:mod:`.postgres_retry`), naming missing privileges
(:mod:`.postgres_privileges`), keeping secrets out of output
(:mod:`.redaction`), and pausing the cyclic GC in hot loops (:mod:`.gc_pause`).
"""
