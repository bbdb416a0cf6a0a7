"""Step 4 of the data flow: upstream events through a follower's policy.

A batch of upstream events goes through the unchanged ``policy()`` and is
recorded with its tracking positions in one transaction. This is the one
package that touches the ``eventsourcing`` library's internals (the recorder
hook); the rest of esbridge uses its public API.
"""
