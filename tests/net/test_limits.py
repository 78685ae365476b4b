"""ConnectionCounter: total and per-address limits, refused sessions never counted."""

from __future__ import annotations

from mailgw.net.limits import ConnectionCounter, Refusal


def test_per_ip_limit_and_release() -> None:
    counter = ConnectionCounter(max_per_ip=2)
    assert counter.admit("192.0.2.1") is None
    assert counter.admit("192.0.2.1") is None
    assert counter.admit("192.0.2.1") is Refusal.PER_IP
    assert counter.count("192.0.2.1") == 2 and counter.total == 2
    assert counter.admit("192.0.2.2") is None
    counter.release("192.0.2.1")
    assert counter.count("192.0.2.1") == 1
    counter.release("192.0.2.1")
    assert counter.per_ip == {"192.0.2.2": 1} and counter.total == 1


def test_total_limit() -> None:
    counter = ConnectionCounter(max_per_ip=5, max_total=2)
    assert counter.admit("a") is None and counter.admit("b") is None
    assert counter.admit("c") is Refusal.TOTAL
    assert counter.per_ip == {"a": 1, "b": 1}


def test_release_of_unknown_address_is_harmless() -> None:
    counter = ConnectionCounter(max_per_ip=1)
    counter.release("never-admitted")
    assert counter.total == 0 and counter.per_ip == {}
