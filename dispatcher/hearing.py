"""Whether the dispatcher has heard what its runners said, up to when.

A runner is lost by its own silence only: its heartbeats stopped. The
dispatcher can miss heartbeats that were sent, for reasons of its own: it
was paused, it is behind on its control queue, the broker pushed them and
they wait in its buffer, or a paused predecessor still holds the queue
(a single active consumer). Queue counts cannot tell these apart. So before
it judges, it sends a mark through its own control queue: the queue keeps
order, and once the mark comes back, every heartbeat published before the
mark was sent has been handled. A deadline that had passed by then passed
by the runner's silence.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable

# A mark not back after this long (lost with a broker restart, say) is sent again.
MARK_PATIENCE = 5.0


class Hearing:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        # Every control message published before this moment has been handled.
        self.heard_up_to = -math.inf
        self._token = ""
        self._sent_at = 0.0

    def mark_due(self) -> bool:
        """Whether to send a mark now: none is on its way, or the last is overdue."""
        return not self._token or self.clock() - self._sent_at > MARK_PATIENCE

    def sent(self) -> str:
        """A new mark's token; the mark leaves now."""
        self._token = uuid.uuid4().hex[:12]
        self._sent_at = self.clock()
        return self._token

    def came_back(self, token: str) -> bool:
        """A mark came back: True if it is the one on its way (older ones, and
        another dispatcher's, say nothing)."""
        if not self._token or token != self._token:
            return False
        self.heard_up_to = max(self.heard_up_to, self._sent_at)
        self._token = ""
        return True

    def forget(self) -> None:
        """Reconnected: what was on its way is gone, and what was heard before says nothing now."""
        self.heard_up_to = -math.inf
        self._token = ""
