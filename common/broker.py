"""The broker connection: the only module that imports pika.

It turns pika's exceptions into our own (BrokerUnavailable, Unroutable), so
the workers' logic never sees a pika type. Every publish is confirmed; shared
messages are persistent and mandatory (delivery rule 1).
"""

from __future__ import annotations

import logging
import random
import re
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.adapters.utils.connection_workflow import AMQPConnectorException

from common import naming
from common.messages import Message
from common.settings import BrokerSettings, SettingsError, redact_url

log = logging.getLogger(__name__)

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
# What opening a connection raises: pika's errors, the socket's, and a
# handshake its stack timeout cut off (a port that accepts and never answers),
# which pika raises as none of its AMQP errors.
CONNECT_ERRORS = (pika.exceptions.AMQPError, OSError, AMQPConnectorException)
OWNER_QUEUE_ARGS = {"x-max-length": 1, "x-overflow": "reject-publish"}
# A runner queue whose runner has been gone this long is deleted by the broker,
# so the management UI does not fill with queues of runners long retired.
RUNNER_QUEUE_EXPIRES_MS = 15 * 60 * 1000
# The poison-message guard of quorum queues: a message delivered this many
# times without an ack (it kills its consumer, say) is dead-lettered by the
# broker, with reason `delivery_limit` in its x-death header. Every return
# counts, a consumer's crash too (RabbitMQ 3.10 and later), so it is set well
# above the redeliveries a few restarts cause. Dead-lettering stays the
# broker's default at-most-once: at-least-once would need reject-publish
# overflow on every source queue, for the rare message lost with a node while
# it moves to the dead-letter queue, which keeps only what no one could use.
DELIVERY_LIMIT = 20


_EXCHANGES = (
    (naming.commits_exchange, "fanout"),
    (naming.control_exchange, "fanout"),
    (naming.results_exchange, "fanout"),
    (naming.jobs_exchange, "direct"),
    (naming.dead_letter_exchange, "fanout"),
    (naming.rpc_exchange, "fanout"),
)
# What a runner publishes to or takes jobs from.
_RUNNER_EXCHANGES = (
    naming.control_exchange,
    naming.results_exchange,
    naming.jobs_exchange,
    naming.dead_letter_exchange,
)


def shared_queue_arguments(ns: str, queue_type: str) -> dict[str, dict[str, Any]]:
    """Every shared queue's declare arguments, by name: what declare_topology
    declares, and what deploy/rabbitmq/definitions.json must say exactly
    (RabbitMQ refuses a redeclare whose arguments differ).

    Quorum queues are replicated over the cluster's nodes. The dispatcher's
    inputs have a single active consumer: standby dispatchers wait behind the
    active one, and take over the moment its connection is gone. The requests
    queue does not, so a standby can answer `volt check` (at a lower consumer
    priority than the active one's); the dead-letter queue has no delivery
    limit, since `volt dead-letters list` takes and returns its messages.
    """
    dlx = {"x-dead-letter-exchange": naming.dead_letter_exchange(ns)}
    quorum = {"x-queue-type": "quorum"} if queue_type == "quorum" else {}
    guard = {"x-delivery-limit": DELIVERY_LIMIT} if quorum else {}
    single = {"x-single-active-consumer": True} if quorum else {}
    inputs = {**quorum, **dlx, **guard, **single}
    return {
        naming.dispatcher_commits_queue(ns): inputs,
        naming.dispatcher_control_queue(ns): inputs,
        naming.dispatcher_results_queue(ns): inputs,
        naming.backlog_queue(ns): {**quorum, **dlx, **guard},
        # Requests expire rather than pile up while the dispatcher is down,
        # and an expired request is not worth a dead letter.
        naming.dispatcher_rpc_queue(ns): {**quorum},
        naming.dead_letter_queue(ns): {**quorum, "x-max-length": DEAD_LETTER_MAX_LENGTH},
        # One message, the owning store's id; a second claim is refused (nacked), not kept.
        naming.dispatcher_owner_queue(ns): {**quorum, **OWNER_QUEUE_ARGS},
    }


def runner_queue_arguments(ns: str, queue_type: str) -> dict[str, Any]:
    """A runner queue's: it expires once its runner has been gone RUNNER_QUEUE_EXPIRES_MS."""
    quorum = {"x-queue-type": "quorum", "x-delivery-limit": DELIVERY_LIMIT} if queue_type == "quorum" else {}
    return {**quorum, "x-dead-letter-exchange": naming.dead_letter_exchange(ns), "x-expires": RUNNER_QUEUE_EXPIRES_MS}


def _bindings(ns: str) -> tuple[tuple[str, str, str], ...]:
    """(queue, exchange, routing key) of every shared queue that has a binding."""
    return (
        (naming.dispatcher_commits_queue(ns), naming.commits_exchange(ns), ""),
        (naming.dispatcher_control_queue(ns), naming.control_exchange(ns), ""),
        (naming.dispatcher_results_queue(ns), naming.results_exchange(ns), ""),
        (naming.backlog_queue(ns), naming.jobs_exchange(ns), naming.BACKLOG_ROUTING_KEY),
    )


class BrokerError(Exception):
    """Base of the errors this module raises."""


class BrokerUnavailable(BrokerError):
    """The connection or channel is gone (or never came); reconnect and retry."""


class Unroutable(BrokerError):
    """A mandatory publish found no queue (e.g. a runner queue that no longer exists)."""


class RpcTimeout(BrokerError):
    """No reply to a request in time."""


class InUse(BrokerError):
    """An exclusive consumer already holds the queue: another process has this
    worker's identity (a second dispatcher on a namespace, a runner id twice)."""


class QueueMismatch(SettingsError):
    """A queue exists with another type or other arguments than this Volt CI
    declares (RabbitMQ cannot change them in place); one line says how to migrate."""


# The reply code of a refusal to touch another connection's exclusive queue.
RESOURCE_LOCKED = 405


@dataclass(frozen=True)
class Refused:
    """The broker's refusal of a question (Broker.ask): its reply code and text."""

    code: int
    text: str


class AckLedger:
    """Which delivery tags of one channel are settled, so that an ack never
    covers a delivery that is not handled yet (delivery rule 2).

    Tags count up from 1 on a channel, over consumed and gotten deliveries
    alike, and pika may hold later deliveries in its buffer while an earlier
    one is handled. A multiple-ack is sent only up to the highest tag below
    which every delivery is settled; held acks above it go one by one.
    """

    def __init__(self) -> None:
        self.floor = 0  # every tag <= floor is settled
        self._above: set[int] = set()  # settled tags > floor
        self.held: list[int] = []

    def settled(self, tag: int) -> None:
        """A delivery was rejected, requeued or acked on its own."""
        self._above.add(tag)
        self._advance()

    def release(self) -> tuple[int | None, list[int]]:
        """Take the held acks: (multiple-ack up to this tag or None, tags to ack one by one)."""
        held, self.held = self.held, []
        self._above.update(held)
        self._advance()
        below = [t for t in held if t <= self.floor]
        return (max(below) if below else None), sorted(t for t in held if t > self.floor)

    def _advance(self) -> None:
        while self.floor + 1 in self._above:
            self.floor += 1
            self._above.discard(self.floor)


class _Confirms:
    """The publisher confirms of one channel, by delivery tag, so that many
    publishes can go out before the first confirm comes back (pika's
    BlockingChannel waits for each publish's confirm before the next)."""

    def __init__(self) -> None:
        self.ready = False  # confirm.select-ok came
        self.last_tag = 0  # the channel numbers its publishes 1, 2, ...
        self.waiting: set[int] = set()
        self.nacked = 0
        # Message ids of the publishes returned unroutable. RabbitMQ sends a
        # basic.return before the confirm of the same message, and the confirm
        # may be a multiple one, so a return is matched by its message id.
        self.returned: set[str] = set()

    def on_select_ok(self, _frame: Any) -> None:
        self.ready = True

    def on_confirm(self, frame: Any) -> None:
        method = frame.method
        done = {t for t in self.waiting if t <= method.delivery_tag} if method.multiple else {method.delivery_tag}
        self.waiting -= done
        if isinstance(method, pika.spec.Basic.Nack):
            self.nacked += len(done)

    def on_return(self, _channel: Any, _method: Any, props: Any, _body: bytes) -> None:
        self.returned.add(props.message_id)


@contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except pika.exceptions.UnroutableError:
        raise Unroutable("message was returned unroutable") from None
    except pika.exceptions.NackError:
        raise BrokerUnavailable("broker refused (nacked) a publish") from None
    except (pika.exceptions.AMQPError, OSError) as exc:
        raise BrokerUnavailable(f"{type(exc).__name__}: {exc}") from None


@dataclass
class Delivery:
    """One received message; ack or reject it on the connection's thread."""

    body: bytes
    queue: str
    headers: dict[str, Any]
    redelivered: bool
    reply_to: str | None
    correlation_id: str | None
    _channel: BlockingChannel = field(repr=False)
    _tag: int = field(repr=False)
    # The ledger of the channel it came on; with holding on (Broker.hold_acks)
    # ack() only notes the tag, and release_acks() sends it.
    _ledger: AckLedger | None = field(default=None, repr=False)
    _hold: bool = field(default=False, repr=False)
    # The sender's RabbitMQ user when it said so; RabbitMQ refuses a user_id
    # that is not the sender's own login, so this one can be trusted.
    user_id: str | None = None

    def ack(self) -> None:
        if self._hold and self._ledger is not None:
            self._ledger.held.append(self._tag)
            return
        with _translated():
            self._channel.basic_ack(self._tag)
        self._settled()

    def requeue(self) -> None:
        with _translated():
            self._channel.basic_nack(self._tag, requeue=True)
        self._settled()

    def reject(self) -> None:
        with _translated():
            self._channel.basic_reject(self._tag, requeue=False)
        self._settled()

    def _settled(self) -> None:
        if self._ledger is not None:
            self._ledger.settled(self._tag)


Handler = Callable[[Delivery], None]


class Broker:
    """A blocking connection with one confirmed channel, and the topology helpers."""

    # What opens a connection: pika's, or (in unit tests of the service loops)
    # an in-memory broker's with the same interface.
    connection_factory: Callable[[pika.URLParameters], Any] = pika.BlockingConnection

    def __init__(self, settings: BrokerSettings, client_name: str) -> None:
        self.settings = settings
        self.ns = settings.namespace
        self.client_name = client_name
        self._conn: pika.BlockingConnection | None = None
        self._ch: BlockingChannel | None = None
        # The node (one of settings.amqp_urls) connected to last.
        self.url = ""
        # Unconfirmed publishes (probes, replies) go on a channel of their own,
        # so they never wait on the broker, even while it blocks publishers.
        self._fire_ch: BlockingChannel | None = None
        self._consumers: dict[str, str] = {}  # consumer tag -> its queue
        # Queues whose consumer the broker cancelled (the queue was deleted).
        self._cancelled_by_broker: list[str] = []
        self._rpc_replies: dict[str, bytes] = {}
        self._rpc_consuming = False
        self._hold = False
        self._ledger = AckLedger()
        # publish_all()'s channel, its confirms tracked by us rather than pika.
        self._batch_ch: BlockingChannel | None = None
        self._confirms = _Confirms()
        # basic.get has a channel (and so delivery tags) of its own.
        self._get_ch: BlockingChannel | None = None
        self._get_ledger = AckLedger()
        # Seconds pika waits on a broker that blocks publishers before it gives
        # the connection up (a worker then reconnects; a command says why).
        self.blocked_timeout = 60.0
        # Seconds without a word after which the broker gives this connection
        # up (and pika too): pika sends a heartbeat frame every half of it when
        # nothing else goes out, and so does the broker.
        self.heartbeat = 30
        # What the connection had received when last looked at, and when that
        # changed (monotonic): see silence().
        self._heard = (0, 0.0)
        # Since when (monotonic) the broker blocks this connection's publishes
        # (a memory or disk alarm), or None; and who wants to know of changes.
        self.blocked_since: float | None = None
        self.on_blocked: Callable[[bool], None] = lambda blocked: None

    # -- connection -------------------------------------------------------

    @property
    def connected(self) -> bool:
        return bool(self._conn and self._conn.is_open and self._ch and self._ch.is_open)

    def silence(self) -> float:
        """Seconds since the broker last sent this connection anything (a
        delivery, an answer, a heartbeat frame), as of the last time pika read
        it: a connection cut off without a close (a network partition) goes
        silent long before pika or the broker gives it up."""
        now = time.monotonic()
        if self._conn is not None:
            received = self._received()
            if received is None:  # unit tests' in-memory broker counts nothing
                return 0.0
            if received != self._heard[0]:
                self._heard = (received, now)
        return now - self._heard[1]

    def _received(self) -> int | None:
        """Bytes the connection has read so far (pika's count), or None without one."""
        return getattr(getattr(self._conn, "_impl", None), "bytes_received", None)

    def connect(self, give_up_after: float | None = None, stopping: Callable[[], bool] = lambda: False) -> None:
        """Connect to one of the broker's nodes, retrying with capped exponential
        backoff and full jitter once every node has failed.

        Several URLs (a cluster) are tried in random order, so workers spread
        over the nodes; the node last connected to goes last, so a worker that
        lost its node tries the others first. With give_up_after, raise
        BrokerUnavailable once that many seconds pass; and raise it at once
        when `stopping()` turns true.
        """
        started = time.monotonic()
        attempt = 0
        while True:
            if stopping():
                raise BrokerUnavailable("stopping")
            failures: list[tuple[str, str]] = []
            for url in self._connect_order():
                try:
                    self._open(url)
                    return
                except CONNECT_ERRORS as exc:
                    self.close()
                    failures.append((url, _describe(exc)))
                    if stopping():
                        raise BrokerUnavailable("stopping") from None
            reason = _failures(failures)
            waited = time.monotonic() - started
            if give_up_after is not None and waited >= give_up_after:
                raise BrokerUnavailable(f"cannot reach RabbitMQ at {_where(failures)}: {reason}") from None
            # Capped at 5 s so that, after an outage, every worker is back
            # well within the dispatcher's 10 s restart grace.
            delay = random.uniform(0, min(5.0, 0.25 * 2**attempt))
            if give_up_after is not None:
                delay = min(delay, max(0.0, give_up_after - waited))
            attempt += 1
            # A worker retries for ever and says so; a one-shot command
            # reports once, when it gives up.
            log.log(
                logging.WARNING if give_up_after is None else logging.DEBUG,
                "broker unavailable (%s); retrying in %.1fs",
                reason,
                delay,
            )
            _sleep(delay, stopping)

    def _connect_order(self) -> list[str]:
        urls = self.settings.amqp_urls
        if len(urls) == 1:
            return urls
        order = random.sample(urls, len(urls))
        if self.url in order:
            order.remove(self.url)
            order.append(self.url)
        return order

    def _open(self, url: str) -> None:
        params = pika.URLParameters(url)
        params.client_properties = {"connection_name": self.client_name}
        params.connection_attempts = 1
        params.socket_timeout = 5
        params.blocked_connection_timeout = self.blocked_timeout
        params.heartbeat = self.heartbeat
        self._conn = type(self).connection_factory(params)
        # BlockingConnection hands Connection.Blocked to its callbacks only
        # once the call that waits returns, and the call that waits is the
        # blocked publish itself: a runner would learn of an alarm only as
        # it ends, and stop its run for want of lease renewals meanwhile.
        # The adapter underneath calls at once, from inside that wait.
        told = getattr(self._conn, "_impl", self._conn)
        told.add_on_connection_blocked_callback(lambda *_: self._set_blocked(True))
        told.add_on_connection_unblocked_callback(lambda *_: self._set_blocked(False))
        self._ch = self._conn.channel()
        self._ch.confirm_delivery()
        self._ch.add_on_cancel_callback(self._on_cancelled_by_broker)
        self._heard = (self._received() or 0, time.monotonic())
        self._fire_ch = self._get_ch = self._batch_ch = None
        self._consumers = {}
        self._cancelled_by_broker = []
        self._rpc_consuming = False
        # Tags of the old channel mean nothing on this one; what they
        # covered and was not acked, the broker delivers again.
        self._ledger = AckLedger()
        self.blocked_since = None
        self.url = url
        log.info("connected to %s as %s", redact_url(url), self.client_name)

    def _set_blocked(self, blocked: bool) -> None:
        if blocked == (self.blocked_since is not None):
            return
        self.blocked_since = time.monotonic() if blocked else None
        log.warning(
            "%s: RabbitMQ %s publishers",
            self.client_name,
            "blocks" if blocked else "no longer blocks",
        )
        self.on_blocked(blocked)

    def run(
        self,
        setup: Callable[[], None],
        step: Callable[[], bool],
        stopping: Callable[[], bool],
        on_lost: Callable[[], bool] = lambda: False,
        retry_on: tuple[type[Exception], ...] = (),
        in_use_patience: float = 120.0,
    ) -> None:
        """A worker's loop: connect, set up, then call step() until it returns True.

        Any broker error (or one of `retry_on`) closes the connection and starts
        over after a jittered delay that doubles with failures close together
        (up to 30 s), so a refused permission does not spin. on_lost() returning
        True ends the loop. InUse before the first successful setup is raised at
        once (another process has this identity); after it, it is retried for
        `in_use_patience` seconds, long enough for the broker to drop a
        connection of ours that it still thinks alive, then raised.
        """
        failures, last_failure = 0, 0.0
        was_set_up = False
        in_use_since: float | None = None
        while not stopping():
            try:
                if not self.connected:
                    self.connect(stopping=stopping)
                    setup()
                    was_set_up, in_use_since = True, None
                if step():
                    return
            except InUse:
                now = time.monotonic()
                in_use_since = in_use_since or now
                if not was_set_up or now - in_use_since > in_use_patience:
                    self.close()
                    raise
                failures += 1
                self._back_off(failures, "its queue is in use by another connection", stopping)
            except Exception as exc:
                if not isinstance(exc, (BrokerError, *retry_on)):
                    raise
                if stopping():
                    break
                now = time.monotonic()
                failures = failures + 1 if now - last_failure < 60 else 1
                last_failure = now
                self.close()
                if on_lost():
                    return
                why = f"lost the broker ({exc})" if isinstance(exc, BrokerError) else str(exc)
                self._back_off(failures, why, stopping)

    def _back_off(self, failures: int, why: str, stopping: Callable[[], bool]) -> None:
        delay = random.uniform(0.5, 1.0) * min(30.0, 0.5 * 2 ** (failures - 1))
        log.warning("%s %s; reconnecting in %.1fs", self.client_name, why, delay)
        self.close()
        _sleep(delay, stopping)

    def close(self) -> None:
        conn, self._conn, self._ch, self._fire_ch, self._get_ch = self._conn, None, None, None, None
        self._batch_ch = None
        if conn is not None and conn.is_open:
            try:
                conn.close()
            except (pika.exceptions.AMQPError, OSError):
                pass

    def _on_cancelled_by_broker(self, frame: Any) -> None:
        queue = self._consumers.pop(frame.method.consumer_tag, None)
        if queue is not None:
            self._cancelled_by_broker.append(queue)

    def process(self, time_limit: float) -> None:
        """Run callbacks for up to time_limit seconds (returns sooner on activity)."""
        with _translated():
            self._connection().process_data_events(time_limit=max(0.0, time_limit))
        if self._cancelled_by_broker:
            # Nothing more would come, and nothing says so but this: start over,
            # and the worker's setup declares its queues again.
            raise BrokerUnavailable(
                f"the broker cancelled our consumer of {', '.join(self._cancelled_by_broker)} (queue deleted?)"
            )
        if self._ch is None or not self._ch.is_open:
            # The broker closed our channel (a consumer timeout, a refused
            # operation): pika says so only when the channel is next used.
            # BlockingChannel keeps the reason only privately; it is worth a log line.
            reason = getattr(self._ch, "_closing_reason", None) or "no reason given"
            raise BrokerUnavailable(f"channel closed by the broker: {reason}")

    def call_threadsafe(self, fn: Callable[[], None]) -> None:
        """Run fn on the connection's thread; the only call safe from other threads."""
        with _translated():
            self._connection().add_callback_threadsafe(fn)

    def _connection(self) -> pika.BlockingConnection:
        if self._conn is None or not self._conn.is_open:
            raise BrokerUnavailable("not connected")
        return self._conn

    def _channel(self) -> BlockingChannel:
        if self._ch is None or not self._ch.is_open:
            raise BrokerUnavailable("not connected")
        return self._ch

    def _fire_channel(self) -> BlockingChannel:
        if self._fire_ch is None or not self._fire_ch.is_open:
            with _translated():
                self._fire_ch = self._connection().channel()
        return self._fire_ch

    # -- topology ---------------------------------------------------------

    @property
    def queue_type(self) -> str:
        return self.settings.queue_type

    def declare_topology(self) -> None:
        """Declare every shared exchange and queue (the dispatcher's job); idempotent.
        QueueMismatch if a queue exists with another type than --queue-type."""
        ns = self.ns
        arguments = shared_queue_arguments(ns, self.queue_type)
        self.declare_exchanges()
        with _translated():
            for queue, exchange, key in _bindings(ns):
                self._declare_bound_queue(queue, exchange, key)
            rpc = naming.dispatcher_rpc_queue(ns)
            self._declare_queue(rpc, arguments[rpc])
            self._channel().queue_bind(rpc, naming.rpc_exchange(ns))
            dead = naming.dead_letter_queue(ns)
            _declare_dead_letter_queue(self, dead)
            self._channel().queue_bind(dead, naming.dead_letter_exchange(ns), routing_key=dead)
            owner = naming.dispatcher_owner_queue(ns)
            self._declare_queue(owner, arguments[owner])

    def declare_exchanges(self) -> None:
        with _translated():
            for name, kind in _EXCHANGES:
                self._channel().exchange_declare(name(self.ns), exchange_type=kind, durable=True)

    def declare_commit_path(self) -> None:
        """What an observer or `volt notify` needs: the commits exchange and the
        dispatcher's commit queue, so no commit is unroutable before the
        dispatcher first runs. Nothing else, so its user needs no more rights."""
        ns = self.ns
        with _translated():
            self._channel().exchange_declare(naming.commits_exchange(ns), exchange_type="fanout", durable=True)
            self._declare_bound_queue(naming.dispatcher_commits_queue(ns), naming.commits_exchange(ns), "")

    def declare_runner_exchanges(self) -> None:
        """The exchanges a runner publishes to and takes jobs from; the queues
        behind them belong to the dispatcher."""
        with _translated():
            for name, kind in _EXCHANGES:
                if name in _RUNNER_EXCHANGES:
                    self._channel().exchange_declare(name(self.ns), exchange_type=kind, durable=True)

    def _declare_bound_queue(self, queue: str, exchange: str, key: str) -> None:
        self._declare_queue(queue, shared_queue_arguments(self.ns, self.queue_type)[queue])
        self._channel().queue_bind(queue, exchange, routing_key=key)

    def _declare_queue(self, queue: str, arguments: dict[str, Any]) -> None:
        """queue.declare on the main channel; QueueMismatch (the connection closed)
        if the queue exists with other arguments."""
        try:
            self._channel().queue_declare(queue, durable=True, arguments=arguments)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 406:  # PRECONDITION_FAILED: other arguments
                raise
            raise QueueMismatch(mismatch_line(self.ns, queue, self.queue_type, exc.reply_text)) from None

    def _reopen_channel(self) -> None:
        """A new main channel after the broker closed the old one (a refused declare)."""
        with _translated():
            self._ch = self._connection().channel()
            self._ch.confirm_delivery()

    def declare_runner_queue(self, runner_id: str) -> str:
        """Declare a runner's own queue, and its own exchange of the same name
        into it (its way to put a mark in its queue: runners may not publish
        to the default exchange). A queue the same runner left as the other
        queue type is declared anew: it is no one else's, and what it held (a
        job not started yet, a command) the dispatcher sends again once the
        job's start timeout passes."""
        queue = naming.runner_queue(self.ns, runner_id)
        args = runner_queue_arguments(self.ns, self.queue_type)
        with _translated():
            try:
                self._declare_queue(queue, args)
            except QueueMismatch:
                self._reopen_channel()
                dropped = self._channel().queue_delete(queue).method.message_count
                self._declare_queue(queue, args)
                log.warning(
                    "runner queue %s was of another type; declared it anew as %s (%d message(s) dropped, sent again)",
                    queue,
                    self.queue_type,
                    dropped,
                )
            self._channel().queue_bind(queue, naming.jobs_exchange(self.ns), naming.runner_routing_key(runner_id))
            # Gone with the queue (auto-delete: once its one binding is).
            self._channel().exchange_declare(queue, exchange_type="fanout", durable=True, auto_delete=True)
            self._channel().queue_bind(queue, queue)
        return queue

    def queue_depth(self, queue: str) -> tuple[int, int] | None:
        """(ready messages, consumers) of a queue, or None if it does not exist."""
        ok = self.ask(lambda ch: ch.queue_declare(queue, passive=True))
        return None if isinstance(ok, Refused) else (ok.method.message_count, ok.method.consumer_count)

    def delete_queue(self, queue: str) -> None:
        with _translated():
            self._channel().queue_delete(queue)

    def delete_exchange(self, exchange: str) -> None:
        with _translated():
            self._channel().exchange_delete(exchange)

    def purge_queue(self, queue: str) -> None:
        with _translated():
            self._channel().queue_purge(queue)

    # -- publishing -------------------------------------------------------

    def publish(
        self,
        exchange: str,
        routing_key: str,
        message: Message | bytes,
        *,
        persistent: bool = True,
        mandatory: bool = True,
        headers: dict[str, Any] | None = None,
        reply_to: str | None = None,
        correlation_id: str | None = None,
        expiration_ms: int | None = None,
        user_id: str | None = None,
        confirm: bool = True,
    ) -> None:
        """Publish and wait for the broker's confirm; raise Unroutable or BrokerUnavailable.

        confirm=False sends it on a channel without confirms and returns at
        once: for what may be lost (replies, probes), never for work.
        """
        body = message if isinstance(message, bytes) else message.to_json()
        props = pika.BasicProperties(
            content_type="application/json",
            delivery_mode=pika.DeliveryMode.Persistent if persistent else None,
            headers=headers,
            reply_to=reply_to,
            correlation_id=correlation_id,
            expiration=str(expiration_ms) if expiration_ms is not None else None,
            type=message.TYPE if isinstance(message, Message) else None,
            user_id=user_id,
        )
        with _translated():
            ch = self._channel() if confirm else self._fire_channel()
            ch.basic_publish(exchange, routing_key, body, properties=props, mandatory=mandatory and confirm)

    def publish_all(self, items: Sequence[tuple[str, str, Message]]) -> list[bool]:
        """Publish each (exchange, routing key, message), persistent, mandatory
        and confirmed like publish(), but all before waiting: one wait for the
        broker's confirms of the lot, where publish() waits once each.

        Returns, per item, whether it was routed (False: returned unroutable,
        where publish() raises Unroutable). Raises BrokerUnavailable if the
        broker nacks any of them or the connection or channel goes; then
        none of them may be taken as sent.
        """
        if not items:
            return []
        bodies = [message.to_json() for _, _, message in items]
        ch, confirms = self._confirming_channel()
        confirms.returned.clear()
        confirms.nacked = 0
        ids = []
        try:
            with _translated():
                for (exchange, routing_key, message), body in zip(items, bodies, strict=True):
                    confirms.last_tag += 1
                    confirms.waiting.add(confirms.last_tag)
                    ids.append(str(confirms.last_tag))
                    props = pika.BasicProperties(
                        content_type="application/json",
                        delivery_mode=pika.DeliveryMode.Persistent,
                        type=message.TYPE,
                        message_id=ids[-1],
                    )
                    ch._impl.basic_publish(exchange, routing_key, body, properties=props, mandatory=True)
                ch._flush_output(lambda: not confirms.waiting)
        except BaseException:
            # Confirms still owed would be counted against the next batch: start that one afresh.
            self._batch_ch = None
            if ch.is_open:
                with suppress(pika.exceptions.AMQPError, OSError):
                    ch.close()
            raise
        if confirms.nacked:
            raise BrokerUnavailable(f"broker refused (nacked) {confirms.nacked} of {len(items)} publish(es)")
        return [i not in confirms.returned for i in ids]

    def _confirming_channel(self) -> tuple[BlockingChannel, _Confirms]:
        """publish_all()'s channel, in confirm mode with our own bookkeeping.

        pika's BlockingChannel cannot have several publishes waiting for their
        confirms, so this talks to the channel underneath it (`_impl`) and waits
        with the blocking channel's `_flush_output`, which, unlike
        process_data_events, runs no consumer's callback meanwhile: both private
        to pika 1.x (pinned below 2 in pyproject.toml)."""
        if self._batch_ch is None or not self._batch_ch.is_open:
            confirms = _Confirms()
            with _translated():
                ch = self._connection().channel()
                ch._impl.confirm_delivery(ack_nack_callback=confirms.on_confirm, callback=confirms.on_select_ok)
                ch._impl.add_on_return_callback(confirms.on_return)
                ch._flush_output(lambda: confirms.ready)
            self._batch_ch, self._confirms = ch, confirms
        return self._batch_ch, self._confirms

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Move a message we cannot use to the dead-letter queue, with the reason."""
        log.warning("dead-lettering a message from %s: %s", delivery.queue, reason)
        headers = dict(delivery.headers)
        headers.update({"x-volt-reason": reason[:1000], "x-volt-queue": delivery.queue})
        try:
            self.publish(naming.dead_letter_exchange(self.ns), "", delivery.body, headers=headers)
        except Unroutable:
            # No dead-letter queue bound: fall back on the queue's own DLX.
            delivery.reject()
            return
        delivery.ack()

    # -- consuming --------------------------------------------------------

    def consume(
        self,
        queue: str,
        handler: Handler,
        prefetch: int = 1,
        exclusive: bool = False,
        priority: int | None = None,
    ) -> str:
        """Deliver `queue`'s messages to handler; with `exclusive`, raise InUse if
        another connection consumes it that way, and keep everyone else who asks
        for it out while we do. `priority`: the broker delivers to the highest
        consumers that have room, to lower ones only when there are none.
        Returns the consumer's tag, for cancel()."""
        if exclusive:
            self.lock(queue)
        ch = self._channel()

        def on_message(
            channel: BlockingChannel,
            method: Any,
            props: pika.BasicProperties,
            body: bytes,
        ) -> None:
            handler(self._delivery(queue, channel, method, props, body))

        arguments = {"x-priority": priority} if priority is not None else None
        with _translated():
            # Per consumer (quorum queues have no global QoS).
            ch.basic_qos(prefetch_count=prefetch)
            try:
                # A classic queue also refuses a second consumer itself.
                tag = ch.basic_consume(
                    queue, on_message, exclusive=exclusive and self.queue_type == "classic", arguments=arguments
                )
                self._consumers[str(tag)] = queue
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code == 403 and "exclusive" in exc.reply_text:
                    self.close()
                    raise InUse(f"queue {queue} is in use by another consumer") from None
                raise
        return str(tag)

    def cancel(self, tag: str) -> None:
        """Cancel one consumer (consume()'s tag); messages not yet taken stay in its queue."""
        with _translated():
            self._channel().basic_cancel(tag)
        self._consumers.pop(tag, None)

    def lock(self, queue: str) -> None:
        """Hold `queue`'s lock (an exclusive queue of this connection's, gone with
        it), or raise InUse if another connection holds it."""
        refused = self.ask(lambda ch: ch.queue_declare(naming.lock_queue(queue), exclusive=True))
        if isinstance(refused, Refused):
            if refused.code == RESOURCE_LOCKED:
                raise InUse(f"queue {queue} is in use by another consumer")
            raise BrokerUnavailable(f"cannot lock {queue}: {refused.text}")

    def locked(self, queue: str) -> bool:
        """Whether some connection holds `queue`'s lock (asked about another
        connection's exclusive queue, RabbitMQ says it is locked)."""
        answer = self.ask(lambda ch: ch.queue_declare(naming.lock_queue(queue), passive=True))
        return not isinstance(answer, Refused) or answer.code == RESOURCE_LOCKED

    def ask(self, question: Callable[[BlockingChannel], Any]) -> Any:
        """`question`'s answer on a throwaway channel (a refusal closes the channel
        it comes on), or the broker's Refused; BrokerUnavailable if it is gone."""
        with _translated():
            ch = self._connection().channel()
        try:
            return question(ch)
        except pika.exceptions.ChannelClosedByBroker as exc:
            return Refused(exc.reply_code, exc.reply_text)
        except (pika.exceptions.AMQPError, OSError) as exc:
            raise BrokerUnavailable(_describe(exc)) from None
        finally:
            if ch.is_open:
                with _translated():
                    ch.close()

    def _delivery(
        self,
        queue: str,
        channel: BlockingChannel,
        method: Any,
        props: Any,
        body: bytes,
        ledger: AckLedger | None = None,
    ) -> Delivery:
        return Delivery(
            body=body,
            queue=queue,
            headers=dict(props.headers or {}),
            redelivered=bool(method.redelivered),
            reply_to=props.reply_to,
            correlation_id=props.correlation_id,
            _channel=channel,
            _tag=method.delivery_tag,
            _ledger=ledger or self._ledger,
            _hold=self._hold,
            user_id=props.user_id,
        )

    def stop_consuming(self) -> None:
        """Cancel every consumer; messages not yet taken stay in their queues."""
        ch = self._channel()
        with _translated():
            for tag in list(self._consumers):
                ch.basic_cancel(tag)
        self._consumers = {}

    def hold_acks(self) -> None:
        """From now on, acks wait for release_acks(): a worker that makes a whole
        round of messages durable at once acks them only after that."""
        self._hold = True

    def release_acks(self) -> None:
        """Send the held acks: one multiple-ack for those below a channel's floor
        (every tag under it is settled), the rest one by one (delivery rule 2)."""
        for ch, ledger in ((self._ch, self._ledger), (self._get_ch, self._get_ledger)):
            top, singles = ledger.release()
            if ch is None or not ch.is_open:
                continue  # the channel died: the broker redelivers them all
            with _translated():
                if top is not None:
                    # Every tag up to `top` is settled (AckLedger): handled and,
                    # with held acks, made durable before this is called.
                    ch.basic_ack(top, multiple=True)
                for tag in singles:
                    ch.basic_ack(tag)

    def drop_held_acks(self) -> None:
        """Forget the held acks (what they were for did not become durable); the
        caller closes the connection so the broker delivers those messages again."""
        self._ledger.held.clear()
        self._get_ledger.held.clear()

    def get(self, queue: str) -> Delivery | None:
        """Take one message from a queue (basic.get), or None if it is empty.

        On a channel of its own: the consuming channel's deliveries are then
        handled in the order of their tags, so their acks go as one multiple-ack,
        and so do the gets'."""
        if self._get_ch is None or not self._get_ch.is_open:
            with _translated():
                self._get_ch = self._connection().channel()
            self._get_ledger = AckLedger()
        ch = self._get_ch
        with _translated():
            method, props, body = ch.basic_get(queue, auto_ack=False)
        if method is None:
            return None
        return self._delivery(queue, ch, method, props, body, ledger=self._get_ledger)

    # -- request/reply ----------------------------------------------------

    def reply(self, request: Delivery, message: Message) -> None:
        """Answer a request, without waiting on a confirm: a requester that has
        gone away is no error, and a broker that blocks publishers must not
        stall the one who answers."""
        if not request.reply_to:
            return
        self.publish(
            "",
            request.reply_to,
            message,
            persistent=False,
            mandatory=False,
            correlation_id=request.correlation_id,
            confirm=False,
        )

    def request(self, message: Message, timeout: float) -> bytes:
        """Send a request to the dispatcher and wait for the reply body."""
        ch = self._channel()
        if not self._rpc_consuming:

            def on_reply(channel: Any, method: Any, props: Any, body: bytes) -> None:
                if props.correlation_id:
                    self._rpc_replies[props.correlation_id] = body

            with _translated():
                ch.basic_consume(DIRECT_REPLY_TO, on_reply, auto_ack=True)
            self._rpc_consuming = True
        corr = uuid.uuid4().hex
        # Requests are transient and expire: a question nobody answered in
        # time is not worth keeping across a broker restart.
        self.publish(
            naming.rpc_exchange(self.ns),
            "",
            message,
            persistent=False,
            reply_to=DIRECT_REPLY_TO,
            correlation_id=corr,
            expiration_ms=int(timeout * 1000),
            # Says who asks; RabbitMQ checks it is this connection's login.
            user_id=pika.URLParameters(self.url or self.settings.amqp_urls[0]).credentials.username,
        )
        deadline = time.monotonic() + timeout
        while corr not in self._rpc_replies:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RpcTimeout(f"no answer from the dispatcher within {timeout:g}s (is `volt dispatcher` running?)")
            self.process(min(left, 0.5))
        return self._rpc_replies.pop(corr)


def _sleep(seconds: float, stopping: Callable[[], bool]) -> None:
    """Sleep, but wake within 0.1 s of `stopping()` turning true."""
    until = time.monotonic() + seconds
    while not stopping():
        left = until - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(0.1, left))


def _describe(exc: BaseException) -> str:
    """One readable line for a connection failure (pika nests the real cause)."""
    if isinstance(exc, pika.exceptions.ProbableAuthenticationError):
        return "authentication refused (check the user and password in the AMQP URL)"
    if isinstance(exc, pika.exceptions.ProbableAccessDeniedError):
        return "access refused (check the virtual host and the user's permissions)"
    inner: object = exc
    while True:
        if isinstance(inner, pika.exceptions.AMQPConnectionError) and inner.args:
            inner = inner.args[0]
        elif isinstance(getattr(inner, "exception", None), BaseException):
            inner = inner.exception  # type: ignore[attr-defined]
        else:
            break
    if isinstance(inner, OSError) and inner.strerror:
        return inner.strerror
    text = repr(inner) if isinstance(inner, BaseException) else str(inner)
    return " ".join(text.split())[:300]


# -- one-shot commands and the dead-letter queue ------------------------------

# The dead-letter queue keeps at most this many messages; past it, the oldest go.
DEAD_LETTER_MAX_LENGTH = 10_000
_warned_dead_letter_args: set[str] = set()


def connect_once(broker: Broker, timeout: float) -> None:
    """Connect `broker` for a one-shot command (`volt status`, `check`, ...).

    A refused connection or login fails at once (once every node refused);
    other failures are retried until `timeout`. A publish the broker blocks
    (memory or disk alarm) fails after `timeout` instead of pika's minute:
    see was_blocked().
    """
    deadline = time.monotonic() + timeout
    while True:
        failures: list[tuple[str, str]] = []
        answered = True
        for url in broker._connect_order():
            params = pika.URLParameters(url)
            params.client_properties = {"connection_name": broker.client_name}
            params.connection_attempts = 1
            params.socket_timeout = max(0.1, min(5.0, timeout))
            params.stack_timeout = max(0.1, timeout)
            params.blocked_connection_timeout = max(0.1, timeout)
            params.heartbeat = 30
            conn: pika.BlockingConnection | None = None
            try:
                conn = pika.BlockingConnection(params)
                ch = conn.channel()
                ch.confirm_delivery()
                broker._conn, broker._ch, broker.url = conn, ch, url
                log.info("connected to %s as %s", redact_url(url), broker.client_name)
                return
            except (pika.exceptions.AMQPError, OSError) as exc:
                if conn is not None and conn.is_open:
                    try:
                        conn.close()
                    except (pika.exceptions.AMQPError, OSError):
                        pass
                failures.append((url, _describe(exc)))
                answered = answered and _refused(exc)
        if answered or time.monotonic() >= deadline:
            raise BrokerUnavailable(f"cannot reach RabbitMQ at {_where(failures)}: {_failures(failures)}") from None
        time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))


def _where(failures: list[tuple[str, str]]) -> str:
    return redact_url(failures[0][0]) if len(failures) == 1 else f"any of {len(failures)} nodes"


def _failures(failures: list[tuple[str, str]]) -> str:
    """Why each node failed, in one line."""
    if len(failures) == 1:
        return failures[0][1]
    return "; ".join(f"{redact_url(url)}: {why}" for url, why in failures)


def _refused(exc: BaseException) -> bool:
    """Whether a connection failure is an answer (no such host, port closed,
    login refused) rather than something that may pass."""
    import socket  # kept with the one-shot helpers it serves

    if isinstance(
        exc,
        (
            pika.exceptions.ProbableAuthenticationError,
            pika.exceptions.ProbableAccessDeniedError,
            pika.exceptions.AuthenticationError,
        ),
    ):
        return True
    inner: object = exc
    for _ in range(5):  # pika nests the socket's error a few levels down
        if isinstance(inner, (ConnectionRefusedError, socket.gaierror)):
            return True
        if isinstance(inner, pika.exceptions.ConnectionClosedByBroker):
            return inner.reply_code in (403, 530)  # access refused, not allowed (vhost)
        if isinstance(inner, pika.exceptions.AMQPConnectionError) and inner.args:
            inner = inner.args[0]
        elif isinstance(getattr(inner, "exception", None), BaseException):
            inner = inner.exception  # type: ignore[attr-defined]
        else:
            break
    return False


def was_blocked(exc: BaseException) -> bool:
    """Whether a BrokerUnavailable came from a publish RabbitMQ kept blocked past
    connect_once's timeout (a memory or disk alarm)."""
    # _translated() raises ours from None: pika's stays the context.
    return isinstance(exc.__context__, pika.exceptions.ConnectionBlockedTimeout)


def _passes(broker: Broker, check: Callable[[BlockingChannel], Any]) -> bool:
    """Whether `check` passes on a throwaway channel (False: the broker refused it)."""
    return not isinstance(broker.ask(check), Refused)


def exchange_exists(broker: Broker, exchange: str) -> bool:
    """Whether an exchange exists (a passive declare, on a throwaway channel)."""
    return _passes(broker, lambda ch: ch.exchange_declare(exchange, passive=True))


def purge_counted(broker: Broker, queue: str) -> int:
    """Empty a queue; how many messages it dropped."""
    with _translated():
        ok = broker._channel().queue_purge(queue)
    return int(ok.method.message_count)


def _declare_dead_letter_queue(broker: Broker, queue: str) -> None:
    """Declare the dead-letter queue with its max length. One declared by an older
    Volt CI without it stays as it is (RabbitMQ refuses to change a queue's
    arguments), with one warning; on a throwaway channel, as the refusal closes it."""
    with _translated():
        ch = broker._connection().channel()
    try:
        ch.queue_declare(queue, durable=True, arguments=shared_queue_arguments(broker.ns, broker.queue_type)[queue])
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code != 406:  # PRECONDITION_FAILED: other arguments
            raise BrokerUnavailable(f"cannot declare {queue}: {exc.reply_text}") from None
        if "x-queue-type" in exc.reply_text:
            raise QueueMismatch(mismatch_line(broker.ns, queue, broker.queue_type, exc.reply_text)) from None
        if queue not in _warned_dead_letter_args:
            _warned_dead_letter_args.add(queue)
            log.warning(
                "%s exists without this version's max length (x-max-length=%d) and stays as it is: "
                "delete it while it is empty to get the limit",
                queue,
                DEAD_LETTER_MAX_LENGTH,
            )
    except (pika.exceptions.AMQPError, OSError) as exc:
        raise BrokerUnavailable(_describe(exc)) from None
    finally:
        if ch.is_open:
            with _translated():
                ch.close()


# -- queues of the other type -------------------------------------------------

_INEQUIVALENT = re.compile(
    r"inequivalent arg '([^']+)'.*?received (?:the value )?'?([^' ]*)'?.*current is (?:the value )?'?([^' ]*)'?"
)


def mismatch_line(ns: str, queue: str, wanted: str, reply_text: str) -> str:
    """One line for a queue that exists with other arguments: what differs and how to migrate."""
    found = _INEQUIVALENT.search(reply_text)
    arg = found.group(1) if found else "arguments"
    migrate = f"`volt migrate-queues --namespace {ns} --queue-type {wanted}`"
    if arg == "x-queue-type":
        current = found.group(3) if found and found.group(3) not in ("", "none") else "classic"
        return (
            f"queue {queue} is a {current} queue, but --queue-type is {wanted}: stop the dispatcher and run "
            f"{migrate} once (it declares the namespace's queues anew and keeps their messages), "
            f"or keep them with --queue-type {current}"
        )
    other = "classic" if wanted == "quorum" else "quorum"
    return (
        f"queue {queue} exists with other arguments than this Volt CI declares ({arg}; say, as a {other} queue): "
        f"stop the dispatcher and run {migrate} once (it declares the namespace's queues anew and keeps their "
        f"messages), or start with the --queue-type it was declared with"
    )


def shared_bindings(ns: str) -> dict[str, list[tuple[str, str]]]:
    """Each shared queue's bindings, as (exchange, routing key), for migrate_queue."""
    out: dict[str, list[tuple[str, str]]] = {q: [(x, k)] for q, x, k in _bindings(ns)}
    rpc, dead = naming.dispatcher_rpc_queue(ns), naming.dead_letter_queue(ns)
    out[rpc] = [(naming.rpc_exchange(ns), rpc)]
    out[dead] = [(naming.dead_letter_exchange(ns), dead)]
    out[naming.dispatcher_owner_queue(ns)] = []  # nothing routes to it: only the dispatcher reads and writes it
    return out


def declares_as(broker: Broker, queue: str, arguments: dict[str, Any]) -> bool:
    """Whether `queue` exists with exactly these arguments (a redeclare on a throwaway channel)."""
    return _passes(broker, lambda ch: ch.queue_declare(queue, durable=True, arguments=arguments))


def migrate_queue(broker: Broker, queue: str, arguments: dict[str, Any], bindings: list[tuple[str, str]]) -> int:
    """Declare `queue` anew with `arguments`, keeping its messages and its
    `bindings` ((exchange, routing key) pairs); how many messages it moved.

    The messages wait in a queue of the new kind meanwhile, which takes the
    bindings first, so what publishers send during the move is kept too
    (a copy may arrive twice; every handler is idempotent). Nobody may
    consume the queue meanwhile: the caller has checked that.
    """
    temp = naming.migrating_queue(queue)
    moved = 0
    with _translated():
        ch = broker._channel()
        ch.queue_declare(temp, durable=True, arguments=arguments)
        for exchange, key in bindings:
            ch.queue_bind(temp, exchange, routing_key=key)
        exists = broker.queue_depth(queue) is not None
        if exists:
            for exchange, key in bindings:
                ch.queue_unbind(queue, exchange, routing_key=key)
            moved = _move(broker, queue, temp)
            ch.queue_delete(queue)
        ch.queue_declare(queue, durable=True, arguments=arguments)
        for exchange, key in bindings:
            ch.queue_bind(queue, exchange, routing_key=key)
            ch.queue_unbind(temp, exchange, routing_key=key)
        _move(broker, temp, queue)
        ch.queue_delete(temp)
    return moved


def _move(broker: Broker, source: str, target: str) -> int:
    """Move every message of `source` to `target`, each acked only once its copy
    is confirmed. By consuming: a quorum queue with a single active consumer
    refuses basic.get."""
    ch = broker._channel()
    taken: list[tuple[int, Any, bytes]] = []
    ch.basic_qos(prefetch_count=500)
    tag = ch.basic_consume(source, lambda _c, m, p, b: taken.append((m.delivery_tag, p, b)))
    count, idle_since = 0, time.monotonic()
    while time.monotonic() - idle_since < 1.0:
        broker._connection().process_data_events(time_limit=0.1)
        if taken:
            idle_since = time.monotonic()
        while taken:
            delivery_tag, props, body = taken.pop(0)
            ch.basic_publish("", target, body, properties=props, mandatory=True)
            ch.basic_ack(delivery_tag)
            count += 1
    ch.basic_cancel(tag)
    return count


def connect_within(broker: Broker, timeout: float) -> None:
    """connect_once for a command that must not wait long (`volt notify` in a git
    hook): a handshake that pika's stack timeout cut off is BrokerUnavailable too,
    which connect_once lets through as pika's own connector error."""
    from pika.adapters.utils.connection_workflow import AMQPConnectorException

    try:
        connect_once(broker, timeout)
    except AMQPConnectorException:
        raise BrokerUnavailable(
            f"cannot reach RabbitMQ at {redact_url(broker.settings.amqp_url)}: no answer within {timeout:g}s"
        ) from None
