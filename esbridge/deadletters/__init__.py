"""Messages that could not be processed: parked, never lost.

The store (:mod:`.store`) keeps parked messages in the follower's own
database; :mod:`.retry` runs them through their follower again once the cause
is fixed (``esbridge dlq retry``).
"""
