"""What the dispatcher's main thread lets other threads, and answers, see.

The main thread owns the registry and the broker connection; the web server's
threads must touch neither. So the main thread copies what the page shows
into an immutable Snapshot and swaps it in whole; readers only ever see one
complete snapshot, never a half-changed registry. The RPC answers read it too,
so a question never costs the loop a broker call.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

from common import naming
from dispatcher.registry import RunnerInfo

if TYPE_CHECKING:
    from dispatcher.service import Dispatcher

# Queue depths cost the broker a passive declare each, so look only this often.
QUEUE_LOOK_EVERY = 5.0
# How often the loop takes a snapshot for the page (which refreshes every 2 s);
# an RPC answer takes its own.
SNAPSHOT_EVERY = 1.0


@dataclass(frozen=True)
class Snapshot:
    runners: tuple[RunnerInfo, ...] = ()  # copies, never the registry's own objects
    # Shared queue name -> (ready, consumers), None when missing; empty until looked at.
    queues: Mapping[str, tuple[int, int] | None] = field(default_factory=lambda: MappingProxyType({}))
    queues_at: float | None = None  # when the queues were last looked at (dispatcher clock)
    clock_at: float = 0.0  # when this was taken, on the dispatcher's clock (runners' last_seen)...
    wall_at: float = 0.0  # ...and on the wall clock

    def now(self, wall: float) -> float:
        """The wall time `wall` on the dispatcher's clock, so a reader can age heartbeats
        past the snapshot (which stops moving while the main thread reconnects)."""
        return self.clock_at + (wall - self.wall_at)

    def depth(self, queue: str) -> tuple[int, int] | None:
        """A queue's depth as last looked at; None for a runner queue (never looked at)."""
        return self.queues.get(queue)


def _copy(info: RunnerInfo) -> RunnerInfo:
    # copy.copy, not dataclasses.replace: no __init__ per runner, several times a second.
    out = copy.copy(info)
    out.labels = list(info.labels)
    return out


def take_snapshot(d: Dispatcher, previous: Snapshot, look_at_queues: bool = True) -> Snapshot:
    """A new snapshot of `d`, on its main thread; the shared queues' depths are looked
    at again only every QUEUE_LOOK_EVERY seconds (and never without look_at_queues),
    else kept from `previous`. Runner queues are never looked at: one broker call
    per runner would grow with the fleet."""
    now = d.clock()
    queues, queues_at = previous.queues, previous.queues_at
    if look_at_queues and (queues_at is None or now - queues_at >= QUEUE_LOOK_EVERY):
        queues = MappingProxyType({name: d.broker.queue_depth(name) for name in naming.shared_queues(d.ns)})
        queues_at = now
    runners = tuple(_copy(r) for r in d.registry.runners.values())
    return Snapshot(runners=runners, queues=queues, queues_at=queues_at, clock_at=now, wall_at=d.wall())
