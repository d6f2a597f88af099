"""`volt dead-letters list|replay|purge`: what no worker could use, looked at, sent back, or dropped.

A dead letter says where it came from in one of two ways: a worker that
could not use a message moves it here itself with `x-volt-reason` and
`x-volt-queue` headers (Broker.dead_letter); a message the broker moved
(rejected, expired, over a queue's length) carries RabbitMQ's `x-death`,
which names the exchange and routing key it was first published with.
Replay publishes each one back there, confirmed, and only then takes it off
the dead-letter queue, so a replay cut short loses nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from typing import Any

from common import exits, naming
from common.broker import Broker, BrokerUnavailable, Delivery, Unroutable, connect_once, purge_counted, was_blocked
from common.logs import escape
from common.settings import BrokerSettings
from dispatcher.client import BLOCKED, DEADLINE_SLACK, QueryFailed, _give_up, add_timeout, deadline

DEFAULT_LIST = 20
PREVIEW_CHARS = 120
# Headers of a past dead-lettering, dropped on replay so the next one says only its own.
_DEATH_HEADERS = ("x-death", "x-first-death-", "x-last-death-", "x-volt-reason", "x-volt-queue")
REPLAYED = "x-volt-replayed"  # how many times a message was replayed


@dataclass(frozen=True)
class Letter:
    """One dead letter as `list` shows it, and where `replay` sends it."""

    reason: str
    queue: str  # where it was taken from; "" when it does not say
    exchange: str | None  # where replay publishes it; None when that is not known
    routing_key: str
    bytes: int
    preview: str
    replayed: int = 0


def route_of(ns: str, queue: str) -> tuple[str, str] | None:
    """The exchange and routing key that put messages in one of this namespace's queues."""
    for name, exchange, key in (
        (naming.dispatcher_commits_queue(ns), naming.commits_exchange(ns), ""),
        (naming.dispatcher_control_queue(ns), naming.control_exchange(ns), ""),
        (naming.dispatcher_results_queue(ns), naming.results_exchange(ns), ""),
        (naming.dispatcher_rpc_queue(ns), naming.rpc_exchange(ns), ""),
        (naming.backlog_queue(ns), naming.jobs_exchange(ns), naming.BACKLOG_ROUTING_KEY),
    ):
        if queue == name:
            return exchange, key
    prefix = naming.runner_queue(ns, "")
    if queue.startswith(prefix) and naming.valid_runner_id(queue[len(prefix) :]):
        return naming.jobs_exchange(ns), naming.runner_routing_key(queue[len(prefix) :])
    return None


def describe(ns: str, d: Delivery) -> Letter:
    """Why a dead letter is one, where it came from, and a line of its body."""
    headers = d.headers
    reason, queue, exchange, key = "no reason given", "", None, ""
    ours, deaths = headers.get("x-volt-queue"), headers.get("x-death")
    if isinstance(ours, str):  # moved here by one of our workers: the latest word
        queue = ours
        reason = escape(str(headers.get("x-volt-reason", "")))[:300] or reason
        route = route_of(ns, queue)
        if route is not None:
            exchange, key = route
    elif isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        death = deaths[0]  # the most recent
        reason = f"{escape(str(death.get('reason', '?')))} by the broker (x-death)"
        queue = str(death.get("queue", ""))
        first_exchange, keys = death.get("exchange"), death.get("routing-keys")
        exchange = first_exchange if isinstance(first_exchange, str) else None
        key = str(keys[0]) if isinstance(keys, list) and keys else ""
    replayed = headers.get(REPLAYED)
    return Letter(
        reason=reason,
        queue=queue,
        exchange=exchange,
        routing_key=key,
        bytes=len(d.body),
        preview=escape(d.body[: PREVIEW_CHARS * 4].decode("utf-8", errors="backslashreplace"))[:PREVIEW_CHARS],
        replayed=replayed if isinstance(replayed, int) and not isinstance(replayed, bool) else 0,
    )


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("dead-letters", help="list, replay or purge the messages no worker could use")
    p.add_argument(
        "action",
        choices=("list", "replay", "purge"),
        help="list: show them and leave them; replay: publish each back where it came from; purge: drop them all",
    )
    p.add_argument(
        "--limit",
        type=_at_least_one,
        metavar="N",
        help=f"list or replay at most N, oldest first (default: {DEFAULT_LIST} for list, all for replay)",
    )
    p.add_argument("--json", action="store_true", help="print the outcome as JSON (default: lines for people)")
    add_timeout(p)
    p.set_defaults(func=main)


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def main(args: argparse.Namespace) -> int:
    settings = BrokerSettings.from_args(args)
    line = f"volt dead-letters: no answer within {args.timeout:g}s; {BLOCKED}, or the network is down"
    with deadline(args.timeout + DEADLINE_SLACK, _give_up(sys.stderr, line, exits.BROKER_UNAVAILABLE)):
        broker = Broker(settings, "volt-dead-letters")
        try:
            connect_once(broker, args.timeout)
            out = _ACTIONS[args.action](broker, settings.namespace, args.limit)
        except BrokerUnavailable as exc:
            raise QueryFailed(BLOCKED if was_blocked(exc) else str(exc)) from None
        finally:
            broker.close()
    if args.json:
        print(json.dumps(out["json"], indent=2))
    else:
        print("\n".join(out["lines"]))
    return exits.OK


def _waiting(broker: Broker, ns: str) -> tuple[str, int]:
    queue = naming.dead_letter_queue(ns)
    depth = broker.queue_depth(queue)
    if depth is None:
        raise QueryFailed(f"no dead-letter queue {queue} (has a dispatcher run in namespace {ns!r}?)")
    return queue, depth[0]


def _list(broker: Broker, ns: str, limit: int | None) -> dict[str, Any]:
    queue, waiting = _waiting(broker, ns)
    taken: list[Delivery] = []
    try:
        # Taken and held unacked, so each get sees the next one; all go back after.
        while len(taken) < min(waiting, limit or DEFAULT_LIST):
            d = broker.get(queue)
            if d is None:
                break
            taken.append(d)
        letters = [describe(ns, d) for d in taken]
    finally:
        for d in taken:
            d.requeue()
    lines = [f"{waiting} dead letter(s) in {queue}" + (f", the oldest {len(letters)}:" if letters else "")]
    for n, letter in enumerate(letters, 1):
        again = f", replayed {letter.replayed}x" if letter.replayed else ""
        lines.append(f"{n:>4}. from {letter.queue or '?'}: {letter.reason} ({letter.bytes} bytes{again})")
        lines.append(f"      {letter.preview}")
    return {"lines": lines, "json": {"queue": queue, "count": waiting, "letters": [asdict(x) for x in letters]}}


def _replay(broker: Broker, ns: str, limit: int | None) -> dict[str, Any]:
    queue, waiting = _waiting(broker, ns)
    # No more than were there at the start: a message that fails again comes
    # back behind them, and must not be replayed round and round.
    todo = min(waiting, limit) if limit else waiting
    kept: list[tuple[Delivery, Letter, str]] = []
    replayed = 0
    try:
        for _ in range(todo):
            d = broker.get(queue)
            if d is None:
                break
            letter = describe(ns, d)
            if letter.exchange is None:
                kept.append((d, letter, "it does not say where it came from"))
                continue
            headers = {k: v for k, v in d.headers.items() if not k.startswith(_DEATH_HEADERS)}
            headers[REPLAYED] = letter.replayed + 1
            try:
                broker.publish(
                    letter.exchange,
                    letter.routing_key,
                    d.body,
                    headers=headers,
                    reply_to=d.reply_to,
                    correlation_id=d.correlation_id,
                )
            except Unroutable:
                kept.append((d, letter, f"no queue takes it any more from {letter.exchange or 'the default exchange'}"))
                continue
            d.ack()  # only once the broker confirmed it where it came from
            replayed += 1
    finally:
        for d, _, _ in kept:
            d.requeue()
    lines = [f"replayed {replayed} of {waiting} dead letter(s) from {queue}"]
    lines += [f"  kept one from {letter.queue or '?'} ({letter.reason}): {why}" for _, letter, why in kept]
    if replayed + len(kept) < waiting:
        lines.append(f"  {waiting - replayed - len(kept)} not looked at (--limit)")
    data = {
        "queue": queue,
        "replayed": replayed,
        "kept": [{**asdict(letter), "why": why} for _, letter, why in kept],
    }
    return {"lines": lines, "json": data}


def _purge(broker: Broker, ns: str, limit: int | None) -> dict[str, Any]:
    if limit is not None:
        raise QueryFailed("purge drops every dead letter; --limit is for list and replay")
    queue, _ = _waiting(broker, ns)
    purged = purge_counted(broker, queue)
    return {"lines": [f"purged {purged} dead letter(s) from {queue}"], "json": {"queue": queue, "purged": purged}}


_ACTIONS = {"list": _list, "replay": _replay, "purge": _purge}
