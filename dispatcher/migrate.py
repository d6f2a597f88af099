"""`volt migrate-queues`: a namespace's shared queues declared anew as
--queue-type (quorum or classic), each keeping its messages.

RabbitMQ cannot change a queue's type in place. Run it once, with the
dispatcher stopped (observers and runners may go on: what they publish
meanwhile is kept). Runner queues need nothing: each runner declares its
own anew when it starts.
"""

from __future__ import annotations

import argparse

from common import exits, naming
from common.broker import (
    Broker,
    BrokerUnavailable,
    connect_once,
    declares_as,
    migrate_queue,
    shared_bindings,
    shared_queue_arguments,
)
from common.settings import BrokerSettings


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "migrate-queues",
        help="declare the namespace's queues anew as --queue-type, keeping their messages (stop the dispatcher first)",
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    settings = BrokerSettings.from_args(args)
    ns, kind = settings.namespace, settings.queue_type
    broker = Broker(settings, "volt-migrate-queues")
    try:
        connect_once(broker, 10)
        wanted = shared_queue_arguments(ns, kind)
        for queue in naming.shared_queues(ns):
            depth = broker.queue_depth(queue)
            if depth is not None and depth[1] > 0:
                raise exits.CommandFailed(f"{queue} has {depth[1]} consumer(s): stop the dispatcher first")
        broker.declare_exchanges()
        bindings = shared_bindings(ns)
        for queue in naming.shared_queues(ns):
            if broker.queue_depth(queue) is not None and declares_as(broker, queue, wanted[queue]):
                print(f"{queue}: already a {kind} queue")
                continue
            moved = migrate_queue(broker, queue, wanted[queue], bindings[queue])
            print(f"{queue}: declared as a {kind} queue, {moved} message(s) kept")
    except BrokerUnavailable as exc:
        raise exits.CommandFailed(str(exc)) from None
    finally:
        broker.close()
    return exits.OK
