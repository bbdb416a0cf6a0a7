"""Application-state replication (projections seed): a replica that copies every event.

The seed's ``Replicator`` read the original's notification log and wrote
copies of the stored events into a replica, using the replica's own
positions to resume. Today that is a process application whose policy
collects the upstream event itself: the copies are recorded atomically with
a tracking record, so a restarted replicator resumes exactly where it stopped.
"""
