"""Deletion requests: checked at the door, queued durably, claimed by processors under leases.

See `ray_unlearn.requests.queue` for the storage layout and the claim protocol.
"""

from ray_unlearn.requests.images import DEFAULT_FORMATS, normalise_image
from ray_unlearn.requests.models import (
    STATES, TERMINAL, LeaseLost, RequestError, RequestNotFound, RequestRecord, check_id,
)
from ray_unlearn.requests.queue import Queue

__all__ = [
    "DEFAULT_FORMATS", "STATES", "TERMINAL", "LeaseLost", "Queue", "RequestError", "RequestNotFound",
    "RequestRecord", "check_id", "normalise_image",
]
