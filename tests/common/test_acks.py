"""The ack ledger: a multiple-ack never covers a delivery that is not settled."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from common.broker import AckLedger


def test_in_order_acks_go_as_one_multiple_ack() -> None:
    ledger = AckLedger()
    ledger.held += [1, 2, 3]
    assert ledger.release() == (3, [])
    assert ledger.floor == 3


def test_a_basic_get_above_buffered_deliveries_is_acked_alone() -> None:
    # Deliveries 2..5 wait in the client's buffer; 6 is a basic.get answered meanwhile.
    ledger = AckLedger()
    ledger.held += [1, 6]
    assert ledger.release() == (1, [6])
    ledger.held += [2, 3, 4, 5]
    assert ledger.release() == (5, [])  # 6 was acked already: the floor passes it
    assert ledger.floor == 6


def test_rejected_deliveries_count_as_settled() -> None:
    ledger = AckLedger()
    ledger.settled(1)  # dead-lettered on its own
    ledger.held += [2]
    assert ledger.release() == (2, [])
    ledger.held += [4]
    ledger.settled(5)
    assert ledger.release() == (None, [4])
    ledger.held += [3]
    assert ledger.release() == (3, [])
    assert ledger.floor == 5


@given(st.integers(min_value=1, max_value=60), st.randoms(use_true_random=False))
def test_whatever_the_order_no_ack_covers_an_unsettled_tag_and_every_held_one_is_sent(
    n: int, rng: random.Random
) -> None:
    ledger = AckLedger()
    order = list(range(1, n + 1))
    rng.shuffle(order)  # the order handlers finish in, buffered deliveries and gets mixed
    handled: set[int] = set()
    held: set[int] = set()
    acked: set[int] = set()
    while order:
        # A round handles a few deliveries; the next few are skipped over, as
        # deliveries still in the client's buffer when a crash ends it all.
        size = rng.randint(1, 5)
        batch, order = order[:size], order[size + rng.randint(0, 2) :]
        for tag in batch:
            if rng.random() < 0.2:
                ledger.settled(tag)  # rejected or requeued on its own
            else:
                ledger.held.append(tag)
                held.add(tag)
            handled.add(tag)
        top, singles = ledger.release()
        covered = set(range(1, top + 1)) - acked if top is not None else set()
        assert covered <= handled  # never a delivery not yet handled
        assert not set(singles) & acked  # never one twice (the broker would close the channel)
        acked |= covered | set(singles)
    assert held <= acked
