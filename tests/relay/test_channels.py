"""Channel model, routing rules, weighted round robin, health (Clock) and limits."""

from __future__ import annotations

from collections import Counter

import pytest
from twisted.internet.task import Clock

from mailgw.relay.channels import (
    ACTIVE,
    PROBING,
    SUSPENDED,
    Channel,
    ChannelSelector,
    MessageRoute,
    Router,
    RoutingRule,
    TokenBucket,
    domain_matches,
    parse_tiers,
)


def selector(clock: Clock | None = None, **kw) -> ChannelSelector:
    channels = [
        Channel("domestic", helo="d.gw.test", source_addresses=("127.0.0.2",)),
        Channel("overseas", weight=1),
        Channel("sdn", weight=1),
        Channel("spam", kind="smarthost", hosts=("127.0.0.1:2525",)),
    ]
    router = Router(
        [
            RoutingRule(
                parse_tiers("domestic; overseas, sdn"),
                recipient_domains=(".cn", "qq.com", "*.163.com"),
            ),
            RoutingRule(parse_tiers("sdn"), sender_domains=("secret.example",)),
            RoutingRule(parse_tiers("spam"), message_class="spam"),
        ],
        default=parse_tiers("overseas, sdn"),
    )
    return ChannelSelector(channels, router, clock or Clock(), **kw)


def test_domain_patterns() -> None:
    assert domain_matches(".cn", "example.cn") and domain_matches(".cn", "a.b.cn")
    assert domain_matches(".cn", "cn") and not domain_matches(".cn", "example.cnn")
    assert domain_matches("*.cn", "a.b.cn") and not domain_matches("*.cn", "cn")
    assert domain_matches("QQ.com", "qq.COM") and not domain_matches("qq.com", "mail.qq.com")
    assert domain_matches("*", "anything.test")


def test_parse_tiers() -> None:
    assert parse_tiers(" domestic ; overseas, sdn ;") == (("domestic",), ("overseas", "sdn"))
    with pytest.raises(ValueError):
        parse_tiers(" ; ")


def test_routing_rules() -> None:
    r = selector().router
    assert r.eligible(MessageRoute("example.cn")) == ["domestic", "overseas", "sdn"]
    assert r.eligible(MessageRoute("qq.com")) == ["domestic", "overseas", "sdn"]
    assert r.eligible(MessageRoute("mail.163.com")) == ["domestic", "overseas", "sdn"]
    assert r.eligible(MessageRoute("example.com")) == ["overseas", "sdn"]
    assert r.eligible(MessageRoute("example.com", "secret.example")) == ["sdn"]
    # The class rule wins although it is listed last.
    assert r.eligible(MessageRoute("example.cn", "secret.example", "spam")) == ["spam"]
    assert r.eligible(MessageRoute("example.com", message_class="newsletter")) == [
        "overseas",
        "sdn",
    ]


def test_domestic_first_then_failover_within_the_next_tier() -> None:
    s = selector()
    route = MessageRoute("example.cn")
    first = s.choose(route)
    assert first is not None and first.name == "domestic"
    s.release("domestic", failed=True, error="421 busy")
    second = s.choose(route, exclude={"domestic"})
    assert second is not None and second.name in ("overseas", "sdn")
    s.release(second.name, failed=True, error="refused")
    third = s.choose(route, exclude={"domestic", second.name})
    assert third is not None and {third.name, second.name} == {"overseas", "sdn"}
    s.release(third.name, failed=True, error="refused")
    assert s.choose(route, exclude={"domestic", "overseas", "sdn"}) is None
    assert s.wait_hint(route, exclude={"domestic", "overseas", "sdn"}) is None  # → deferred


def test_weighted_round_robin_spreads_100_messages_evenly() -> None:
    s = selector()
    counts: Counter[str] = Counter()
    for _ in range(100):
        c = s.choose(MessageRoute("example.com"))
        assert c is not None
        counts[c.name] += 1
        s.release(c.name)
    assert abs(counts["overseas"] - 50) <= 5 and abs(counts["sdn"] - 50) <= 5
    assert counts == {"overseas": 50, "sdn": 50}


def test_weights_are_honoured_and_interleaved() -> None:
    router = Router([], default=(("a", "b"),))
    s = ChannelSelector([Channel("a", weight=3), Channel("b", weight=1)], router, Clock())
    picks = []
    for _ in range(8):
        c = s.choose(MessageRoute("x.test"))
        assert c is not None
        picks.append(c.name)
        s.release(c.name)
    assert picks == ["a", "a", "b", "a", "a", "a", "b", "a"]


def test_suspension_cooldown_and_probe() -> None:
    clock = Clock()
    s = selector(clock, failure_threshold=3, cooldown=60)
    route = MessageRoute("example.com", "secret.example")  # sdn only
    for _ in range(3):
        c = s.choose(route)
        assert c is not None and c.name == "sdn"
        s.release("sdn", failed=True, error="connection refused")
    assert s.health["sdn"].state == SUSPENDED
    assert s.choose(route) is None
    assert s.wait_hint(route) == 60
    clock.advance(30)
    assert s.wait_hint(route) == 30
    clock.advance(30)
    probe = s.choose(route)
    assert probe is not None and s.health["sdn"].state == PROBING
    assert s.choose(route) is None and s.wait_hint(route) == 0  # one probe at a time
    s.release("sdn", failed=True, error="still down")
    assert s.health["sdn"].state == SUSPENDED  # a failed probe suspends again
    clock.advance(60)
    assert s.choose(route) is not None
    s.release("sdn")
    assert s.health["sdn"].state == ACTIVE and s.health["sdn"].consecutive_failures == 0
    row = next(r for r in s.status() if r["name"] == "sdn")
    assert row["attempts"] == 5 and row["failures"] == 4 and row["successes"] == 1
    assert row["last_error"] == "still down" and row["last_error_at"] == 60
    assert row["state"] == ACTIVE and row["suspended_until"] == 0.0


def test_a_suspended_tier_falls_through_to_the_next() -> None:
    s = selector(failure_threshold=1)
    route = MessageRoute("example.cn")
    c = s.choose(route)
    assert c is not None and c.name == "domestic"
    s.release("domestic", failed=True, error="x")
    c = s.choose(route)
    assert c is not None and c.name in ("overseas", "sdn")


def test_success_resets_consecutive_failures() -> None:
    s = selector(failure_threshold=2)
    route = MessageRoute("example.com", "secret.example")
    for failed in (True, False, True, False):
        assert s.choose(route) is not None
        s.release("sdn", failed=failed)
    assert s.health["sdn"].state == ACTIVE


def test_concurrency_limit() -> None:
    router = Router([], default=(("a",),))
    s = ChannelSelector([Channel("a", concurrency=2)], router, Clock())
    route = MessageRoute("x.test")
    assert s.choose(route) and s.choose(route)
    assert s.choose(route) is None and s.wait_hint(route) == 0
    s.release("a")
    assert s.choose(route) is not None


def test_rate_limit_token_bucket() -> None:
    clock = Clock()
    router = Router([], default=(("a",),))
    s = ChannelSelector([Channel("a", rate_per_minute=60, burst=2)], router, clock)
    route = MessageRoute("x.test")
    for _ in range(2):
        assert s.choose(route) is not None
        s.release("a")
    assert s.choose(route) is None
    assert s.wait_hint(route) == pytest.approx(1.0)
    clock.advance(0.5)
    assert s.choose(route) is None and s.wait_hint(route) == pytest.approx(0.5)
    clock.advance(0.5)
    assert s.choose(route) is not None


def test_token_bucket_refills_to_capacity() -> None:
    clock = Clock()
    b = TokenBucket(rate=1.0, capacity=3, clock=clock)
    assert [b.take() for _ in range(4)] == [True, True, True, False]
    clock.advance(100)
    assert [b.take() for _ in range(4)] == [True, True, True, False]
    assert b.wait_time() == pytest.approx(1.0)


def test_default_burst_is_a_tenth_of_the_minute_rate() -> None:
    router = Router([], default=(("a",),))
    s = ChannelSelector([Channel("a", rate_per_minute=600)], router, Clock())
    assert s.buckets["a"].capacity == 60


def test_channel_validation() -> None:
    with pytest.raises(ValueError, match="kind"):
        Channel("x", kind="carrier-pigeon")
    with pytest.raises(ValueError, match="hosts"):
        Channel("x", kind="smarthost")
    with pytest.raises(ValueError, match="weight"):
        Channel("x", weight=0)
    with pytest.raises(ValueError, match="tls"):
        Channel("x", tls="maybe")
    with pytest.raises(ValueError, match="unknown channels: nope"):
        ChannelSelector([Channel("a")], Router([], default=(("a", "nope"),)), Clock())


def test_a_forced_channel_is_the_only_one_used() -> None:
    """``Verdict.reroute``: the envelope's channel overrides class and domain rules; a channel
    this node does not have gives no tier (the message waits and is deferred)."""
    s = selector()
    route = MessageRoute("example.cn", message_class="spam", channel="sdn")
    assert s.eligible(route) == ["sdn"]
    for _ in range(3):
        chosen = s.choose(route)
        assert chosen is not None and chosen.name == "sdn"
        s.release("sdn")
    missing = MessageRoute("example.cn", channel="nowhere")
    assert s.eligible(missing) == []
    assert s.choose(missing) is None and s.wait_hint(missing) is None
