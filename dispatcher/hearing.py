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

# A new mark goes out at most this often while one is on its way (the last
# may have been lost with a broker restart). Those on their way still count
# when they come back, however late: a queue that is always some seconds
# behind delays the verdict by as much, never for good.
MARK_PATIENCE = 5.0
# Marks on their way, kept at the most; the oldest are forgotten first.
MARKS_KEPT = 64


class Hearing:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        # Every control message published before this moment has been handled.
        self.heard_up_to = -math.inf
        self._sent: dict[str, float] = {}  # token -> when it went out, oldest first

    def mark_due(self) -> bool:
        """Whether to send a mark now: none is on its way, or the last went out a while ago."""
        return not self._sent or self.clock() - max(self._sent.values()) > MARK_PATIENCE

    def sent(self) -> str:
        """A new mark's token; the mark leaves now."""
        token = uuid.uuid4().hex[:12]
        self._sent[token] = self.clock()
        while len(self._sent) > MARKS_KEPT:
            del self._sent[next(iter(self._sent))]
        return token

    def came_back(self, token: str) -> bool:
        """A mark came back: True if it is one of ours on its way (another
        dispatcher's, a forged one or one from before a reconnect say nothing)."""
        at = self._sent.pop(token, None)
        if at is None:
            return False
        self.heard_up_to = max(self.heard_up_to, at)
        # The ones sent before it were ahead of it in the queue: lost, if still not back.
        self._sent = {t: when for t, when in self._sent.items() if when > at}
        return True

    def forget(self) -> None:
        """Reconnected: what was on its way is gone, and what was heard before says nothing now."""
        self.heard_up_to = -math.inf
        self._sent = {}
