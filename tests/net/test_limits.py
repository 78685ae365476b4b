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


def test_shared_total_caps_every_role_together() -> None:
    from mailgw.net.limits import SharedTotal

    shared = SharedTotal(3)
    mx = ConnectionCounter(max_per_ip=5, max_total=2, shared=shared)
    pop3 = ConnectionCounter(max_per_ip=5, max_total=10, shared=shared)
    assert mx.admit("a") is None and mx.admit("b") is None
    assert mx.admit("c") is Refusal.TOTAL  # the role's own cap
    assert pop3.admit("d") is None
    assert pop3.admit("e") is Refusal.TOTAL  # the process total
    assert shared.total == 3
    mx.release("a")
    assert shared.total == 2 and pop3.admit("e") is None


def test_stressed_from_80_percent_of_a_cap() -> None:
    from mailgw.net.limits import SharedTotal

    counter = ConnectionCounter(max_per_ip=50, max_total=10)
    for n in range(7):
        counter.admit(f"192.0.2.{n}")
    assert not counter.stressed
    counter.admit("192.0.2.99")
    assert counter.stressed
    shared = SharedTotal(5)
    other = ConnectionCounter(max_per_ip=50, max_total=100, shared=shared)
    for n in range(4):
        other.admit(f"198.51.100.{n}")
    assert other.stressed  # 4 of the process's 5


def test_fit_caps_keeps_a_share_for_every_role() -> None:
    from mailgw.net.limits import fit_caps

    roomy = fit_caps(100_000, 256, 4000, {"mx": 1000, "pop3": 1000, "imap": 1000})
    assert roomy.total == 4000 and roomy.roles == {"mx": 1000, "pop3": 1000, "imap": 1000}
    assert not roomy.lowered
    tight = fit_caps(1024, 256, 4000, {"mx": 1000, "pop3": 1000, "imap": 2000})
    assert tight.lowered and tight.total == 768
    assert tight.roles == {"mx": 192, "pop3": 192, "imap": 384}
    assert sum(tight.roles.values()) <= 768
    chosen = fit_caps(100_000, 256, 24, {"mx": 1000, "pop3": 20})  # a total set on purpose
    assert chosen.total == 24 and chosen.roles == {"mx": 1000, "pop3": 20}


def test_raise_nofile_goes_to_the_hard_limit_or_what_is_asked() -> None:
    import resource

    from mailgw.net.limits import raise_nofile

    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        soft, hard = raise_nofile()
        assert hard == before[1]
        assert soft == hard or hard == resource.RLIM_INFINITY
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, before[1]), before[1]))
        assert raise_nofile(200)[0] == min(256, before[1])  # never lowered
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)
