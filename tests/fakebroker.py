"""An in-memory RabbitMQ behind pika's BlockingConnection interface, for unit
tests of the three service loops (common/broker.py runs on it unchanged).

It keeps what the delivery rules depend on: delivery tags per channel,
counted over consumed and gotten messages alike; deliveries that the client
library has received but not yet handed to the consumer (pika buffers them
while it waits for, say, a basic.get's answer); multiple-acks; redelivery of
everything unacked when a connection dies; exclusive consumers (which, as on
RabbitMQ, only classic queues enforce) and exclusive queues (locks, dropped
with their connection); single-active-consumer queues and consumer
priorities; a redeclare with other arguments refused; mandatory publishes
that find no queue; and a broker that blocks publishers.

It also counts what a real broker would not tell: acks that covered a
delivery the consumer had not been handed yet (`acked_unhandled`).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pika.exceptions
import pika.spec


@dataclass
class Msg:
    body: bytes
    props: Any
    exchange: str
    routing_key: str
    redelivered: bool = False


@dataclass
class Queue:
    name: str
    arguments: dict[str, Any]
    messages: deque[Msg] = field(default_factory=deque)
    consumers: list[Consumer] = field(default_factory=list)
    owner: FakeConnection | None = None  # an exclusive queue's connection

    @property
    def classic(self) -> bool:
        return self.arguments.get("x-queue-type", "classic") == "classic"

    def receivers(self) -> list[Consumer]:
        """Who may be given a message now: with a single active consumer, the
        first one registered; else those of the highest priority."""
        if not self.consumers:
            return []
        if self.arguments.get("x-single-active-consumer"):
            return self.consumers[:1]
        top = max(c.priority for c in self.consumers)
        return [c for c in self.consumers if c.priority == top]


@dataclass
class Consumer:
    channel: FakeChannel
    queue: str
    callback: Callable[..., None]
    exclusive: bool
    tag: str
    prefetch: int
    priority: int = 0


class FakeRabbit:
    """The broker: exchanges, queues, bindings, and the connections to it."""

    def __init__(self) -> None:
        self.exchanges: dict[str, str] = {"": "direct"}
        self.queues: dict[str, Queue] = {}
        self.bindings: list[tuple[str, str, str]] = []  # (queue, exchange, key)
        self.connections: list[FakeConnection] = []
        self.blocked = False
        self.acked_unhandled = 0
        self.refuse_connections = False
        self.published: list[Msg] = []

    def connect(self, params: Any = None) -> FakeConnection:
        if self.refuse_connections:
            raise pika.exceptions.AMQPConnectionError("Connection refused")
        conn = FakeConnection(self)
        self.connections.append(conn)
        return conn

    # -- routing ----------------------------------------------------------

    def route(self, exchange: str, key: str) -> list[Queue]:
        if exchange == "":
            return [self.queues[key]] if key in self.queues else []
        kind = self.exchanges.get(exchange)
        if kind is None:
            raise pika.exceptions.ChannelClosedByBroker(404, f"NOT_FOUND - no exchange '{exchange}'")
        names = [q for q, ex, k in self.bindings if ex == exchange and (kind == "fanout" or k == key)]
        return [self.queues[n] for n in dict.fromkeys(names) if n in self.queues]

    def dead_letter(self, queue: Queue, msg: Msg) -> None:
        dlx = queue.arguments.get("x-dead-letter-exchange")
        if dlx:
            for target in self.route(dlx, msg.routing_key):
                target.messages.append(Msg(msg.body, msg.props, dlx, msg.routing_key))

    def delete(self, name: str) -> None:
        """Delete a queue (an operator, its expiry): its consumers are told, as
        RabbitMQ tells them with basic.cancel."""
        q = self.queues.pop(name, None)
        self.bindings = [b for b in self.bindings if b[0] != name]
        for consumer in q.consumers if q else []:
            consumer.channel.consumers.remove(consumer)
            consumer.channel.cancelled.append(consumer.tag)

    def depth(self, name: str) -> int:
        return len(self.queues[name].messages)

    def take_all(self, name: str) -> list[Msg]:
        """Empty a queue, returning what it held (a test reading what was published)."""
        q = self.queues[name]
        out = list(q.messages)
        q.messages.clear()
        return out

    # -- delivery ---------------------------------------------------------

    def pump(self) -> None:
        """Move ready messages to consumers' client buffers, within prefetch."""
        for queue in self.queues.values():
            for consumer in queue.receivers():
                ch = consumer.channel
                while queue.messages and ch.is_open and ch.unacked_count(consumer) < consumer.prefetch:
                    msg = queue.messages.popleft()
                    ch.receive(queue, msg, consumer)


class FakeConnection:
    def __init__(self, rabbit: FakeRabbit) -> None:
        self.rabbit = rabbit
        self.is_open = True
        self.channels: list[FakeChannel] = []
        self._threadsafe: list[Callable[[], None]] = []
        self._on_blocked: list[Callable[..., None]] = []
        self._on_unblocked: list[Callable[..., None]] = []
        self.told_blocked = False

    def channel(self) -> FakeChannel:
        self._check()
        ch = FakeChannel(self)
        self.channels.append(ch)
        return ch

    def _check(self) -> None:
        if not self.is_open:
            raise pika.exceptions.ConnectionWrongStateError("connection closed")

    def process_data_events(self, time_limit: float = 0) -> None:
        self._check()
        while self._threadsafe:
            self._threadsafe.pop(0)()
        if self.told_blocked and not self.rabbit.blocked:
            self.told_blocked = False
            for fn in self._on_unblocked:
                fn(self, None)
        self.rabbit.pump()
        for ch in list(self.channels):
            ch.dispatch()

    def add_callback_threadsafe(self, fn: Callable[[], None]) -> None:
        self._check()
        self._threadsafe.append(fn)

    def add_on_connection_blocked_callback(self, fn: Callable[..., None]) -> None:
        self._on_blocked.append(fn)

    def add_on_connection_unblocked_callback(self, fn: Callable[..., None]) -> None:
        self._on_unblocked.append(fn)

    def note_publish(self) -> None:
        """RabbitMQ tells a connection it blocks publishers when it publishes."""
        if self.rabbit.blocked and not self.told_blocked:
            self.told_blocked = True
            for fn in self._on_blocked:
                fn(self, None)

    def close(self) -> None:
        """Also what a crash looks like to the broker: everything unacked goes back."""
        if not self.is_open:
            return
        self.is_open = False
        for ch in self.channels:
            ch.drop()
        for name in [n for n, q in self.rabbit.queues.items() if q.owner is self]:
            self.rabbit.queues.pop(name)
        if self in self.rabbit.connections:
            self.rabbit.connections.remove(self)


class FakeChannel:
    _consumer_tags = itertools.count(1)

    def __init__(self, conn: FakeConnection) -> None:
        self.conn = conn
        self.rabbit = conn.rabbit
        self.is_open = True
        self.confirming = False
        self.prefetch = 0
        self._tags = itertools.count(1)
        # tag -> (queue, message, the consumer it went to; None for a basic.get)
        self.unacked: dict[int, tuple[Queue, Msg, Consumer | None]] = {}
        self.buffer: deque[tuple[int, Queue, Msg, Consumer]] = deque()
        self.consumers: list[Consumer] = []
        self.impl: FakeImpl | None = None
        self.cancelled: list[str] = []  # consumer tags the broker cancelled, not told yet
        self._on_cancel: list[Callable[[Any], None]] = []

    # -- the state a broker keeps per channel ----------------------------

    def unacked_count(self, consumer: Consumer) -> int:
        """Prefetch counts per consumer (basic.qos without global)."""
        return sum(1 for *_, c in self.unacked.values() if c is consumer)

    def receive(self, queue: Queue, msg: Msg, consumer: Consumer) -> None:
        tag = next(self._tags)
        self.unacked[tag] = (queue, msg, consumer)
        self.buffer.append((tag, queue, msg, consumer))

    def dispatch(self) -> None:
        while self.buffer and self.is_open:
            tag, queue, msg, consumer = self.buffer.popleft()
            method = SimpleNamespace(delivery_tag=tag, redelivered=msg.redelivered, routing_key=msg.routing_key)
            consumer.callback(self, method, msg.props, msg.body)
        while self.cancelled and self.is_open:
            frame = SimpleNamespace(method=SimpleNamespace(consumer_tag=self.cancelled.pop(0)))
            for fn in self._on_cancel:
                fn(frame)

    def drop(self) -> None:
        self.is_open = False
        for tag in sorted(self.unacked, reverse=True):
            queue, msg, _ = self.unacked[tag]
            msg.redelivered = True
            queue.messages.appendleft(msg)
        self.unacked.clear()
        self.buffer.clear()
        for consumer in self.consumers:
            q = self.rabbit.queues.get(consumer.queue)
            if q is not None and consumer in q.consumers:
                q.consumers.remove(consumer)
        self.consumers.clear()

    def _fail(self, code: int, text: str) -> None:
        self.drop()
        raise pika.exceptions.ChannelClosedByBroker(code, text)

    def _check(self) -> None:
        if not self.is_open or not self.conn.is_open:
            raise pika.exceptions.ChannelWrongStateError("channel closed")

    # -- pika's BlockingChannel -----------------------------------------

    def confirm_delivery(self) -> None:
        self.confirming = True

    def close(self) -> None:
        self.drop()

    def exchange_declare(
        self, exchange: str, exchange_type: str = "direct", durable: bool = False, auto_delete: bool = False
    ) -> None:
        self._check()
        self.rabbit.exchanges.setdefault(exchange, exchange_type)

    def exchange_delete(self, exchange: str) -> None:
        self.rabbit.exchanges.pop(exchange, None)

    def queue_declare(
        self,
        queue: str,
        passive: bool = False,
        durable: bool = False,
        exclusive: bool = False,
        arguments: dict[str, Any] | None = None,
    ) -> Any:
        self._check()
        q = self.rabbit.queues.get(queue)
        if q is not None and q.owner is not None and q.owner is not self.conn:
            self._fail(405, f"RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{queue}' in vhost '/'")
        if q is None:
            if passive:
                self._fail(404, f"NOT_FOUND - no queue '{queue}'")
            q = self.rabbit.queues[queue] = Queue(queue, dict(arguments or {}), owner=self.conn if exclusive else None)
        elif not passive and dict(arguments or {}) != q.arguments:
            differ = sorted(set(q.arguments.items()) ^ set((arguments or {}).items()))[0][0]
            self._fail(
                406,
                f"PRECONDITION_FAILED - inequivalent arg '{differ}' for queue '{queue}' in vhost '/': "
                f"received {(arguments or {}).get(differ, 'none')!r} but current is {q.arguments.get(differ, 'none')!r}",
            )
        return SimpleNamespace(method=SimpleNamespace(message_count=len(q.messages), consumer_count=len(q.consumers)))

    def queue_bind(self, queue: str, exchange: str, routing_key: str = "") -> None:
        self._check()
        if (queue, exchange, routing_key or "") not in self.rabbit.bindings:
            self.rabbit.bindings.append((queue, exchange, routing_key or ""))

    def queue_unbind(self, queue: str, exchange: str, routing_key: str = "") -> None:
        self._check()
        self.rabbit.bindings = [b for b in self.rabbit.bindings if b != (queue, exchange, routing_key or "")]

    def queue_delete(self, queue: str) -> Any:
        q = self.rabbit.queues.get(queue)
        count = len(q.messages) if q else 0
        self.rabbit.delete(queue)
        return SimpleNamespace(method=SimpleNamespace(message_count=count))

    def add_on_cancel_callback(self, fn: Callable[[Any], None]) -> None:
        self._on_cancel.append(fn)

    def queue_purge(self, queue: str) -> None:
        self.rabbit.queues[queue].messages.clear()

    def basic_qos(self, prefetch_count: int = 0) -> None:
        self.prefetch = prefetch_count or 10**9

    def basic_consume(
        self,
        queue: str,
        on_message_callback: Callable[..., None],
        auto_ack: bool = False,
        exclusive: bool = False,
        arguments: dict[str, Any] | None = None,
    ) -> str:
        self._check()
        q = self.rabbit.queues.get(queue)
        if q is None:
            self._fail(404, f"NOT_FOUND - no queue '{queue}'")
        assert q is not None
        # RabbitMQ's quorum queues take an exclusive consumer as any other.
        if q.classic and (any(c.exclusive for c in q.consumers) or (exclusive and q.consumers)):
            self._fail(403, f"ACCESS_REFUSED - queue '{queue}' in vhost '/' in exclusive use")
        consumer = Consumer(
            self,
            queue,
            on_message_callback,
            exclusive,
            f"ctag{next(self._consumer_tags)}",
            self.prefetch or 10**9,
            int((arguments or {}).get("x-priority", 0)),
        )
        q.consumers.append(consumer)
        self.consumers.append(consumer)
        return consumer.tag

    def basic_cancel(self, tag: str) -> None:
        for consumer in [c for c in self.consumers if c.tag == tag]:
            self.consumers.remove(consumer)
            q = self.rabbit.queues.get(consumer.queue)
            if q is not None and consumer in q.consumers:
                q.consumers.remove(consumer)

    def basic_get(self, queue: str, auto_ack: bool = False) -> tuple[Any, Any, Any]:
        self._check()
        # While pika waits for get-ok it reads, and buffers, deliveries for
        # this channel's consumers: they take the lower tags.
        self.rabbit.pump()
        q = self.rabbit.queues[queue]
        if not q.messages:
            return None, None, None
        msg = q.messages.popleft()
        tag = next(self._tags)
        self.unacked[tag] = (q, msg, None)
        return SimpleNamespace(delivery_tag=tag, redelivered=msg.redelivered), msg.props, msg.body

    def basic_ack(self, delivery_tag: int = 0, multiple: bool = False) -> None:
        self._check()
        tags = [t for t in self.unacked if t <= delivery_tag] if multiple else [delivery_tag]
        if not multiple and delivery_tag not in self.unacked:
            self._fail(406, f"PRECONDITION_FAILED - unknown delivery tag {delivery_tag}")
        buffered = {t for t, *_ in self.buffer}
        self.rabbit.acked_unhandled += len(buffered.intersection(tags))
        for t in tags:
            del self.unacked[t]

    def basic_nack(self, delivery_tag: int, requeue: bool = True) -> None:
        self._check()
        if delivery_tag not in self.unacked:
            self._fail(406, f"PRECONDITION_FAILED - unknown delivery tag {delivery_tag}")
        queue, msg, _ = self.unacked.pop(delivery_tag)
        if requeue:
            msg.redelivered = True
            queue.messages.appendleft(msg)
        else:
            self.rabbit.dead_letter(queue, msg)

    def basic_reject(self, delivery_tag: int, requeue: bool = False) -> None:
        self.basic_nack(delivery_tag, requeue=requeue)

    def basic_publish(
        self, exchange: str, routing_key: str, body: bytes, properties: Any = None, mandatory: bool = False
    ) -> None:
        self._check()
        self.conn.note_publish()
        if self.rabbit.blocked and self.confirming:
            # A real broker holds the confirm until it unblocks; pika gives up after its timeout.
            raise pika.exceptions.ConnectionBlockedTimeout()
        if not self.deliver(exchange, routing_key, body, properties, mandatory and self.confirming):
            raise pika.exceptions.UnroutableError([])

    def deliver(self, exchange: str, routing_key: str, body: bytes, properties: Any, mandatory: bool) -> bool:
        """Route a published message; False if it was mandatory and found no queue."""
        queues = self.rabbit.route(exchange, routing_key)
        if not queues and mandatory:
            return False
        msg = Msg(body, properties or SimpleNamespace(headers=None), exchange, routing_key)
        self.rabbit.published.append(msg)
        for q in queues:
            q.messages.append(Msg(body, msg.props, exchange, routing_key))
        return True

    # -- what Broker.publish_all reaches under the blocking channel --------

    @property
    def _impl(self) -> FakeImpl:
        if self.impl is None:
            self.impl = FakeImpl(self)
        return self.impl

    def _flush_output(self, *waiters: Callable[[], bool]) -> None:
        self._check()
        if any(ready() for ready in waiters):
            return
        if self.rabbit.blocked:
            raise pika.exceptions.ConnectionBlockedTimeout()
        raise AssertionError("a fake broker answers at once: nothing left to wait for")


class FakeImpl:
    """pika's asynchronous channel under a BlockingChannel: confirms and
    returns go to callbacks, each publish confirmed at once (or, while the
    broker blocks publishers, never)."""

    def __init__(self, ch: FakeChannel) -> None:
        self.ch = ch
        self.tag = 0
        self.on_confirm: Callable[[Any], None] = lambda frame: None
        self.on_return: Callable[..., None] = lambda *args: None

    def confirm_delivery(self, ack_nack_callback: Callable[[Any], None], callback: Callable[[Any], None]) -> None:
        self.ch.confirming = True
        self.on_confirm = ack_nack_callback
        callback(None)

    def add_on_return_callback(self, fn: Callable[..., None]) -> None:
        self.on_return = fn

    def basic_publish(
        self, exchange: str, routing_key: str, body: bytes, properties: Any = None, mandatory: bool = False
    ) -> None:
        self.ch._check()
        self.ch.conn.note_publish()
        self.tag += 1
        if self.ch.rabbit.blocked:
            return  # held until the broker unblocks
        if not self.ch.deliver(exchange, routing_key, body, properties, mandatory):
            self.on_return(self, SimpleNamespace(reply_code=312), properties, body)
        self.on_confirm(SimpleNamespace(method=pika.spec.Basic.Ack(delivery_tag=self.tag, multiple=False)))
