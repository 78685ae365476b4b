"""Local delivery on cluster nodes: users whose mailbox is on another node go to the relay
(which forwards over LMTP); users mapped to this node are stored here."""

from __future__ import annotations


class FakeRelay:
    def __init__(self) -> None:
        self.handed: list[str] = []

    def handover(self, queue_id: str) -> None:
        self.handed.append(queue_id)


class FakeMap:
    def __init__(self, nodes: dict[str, str]) -> None:
        self.nodes = nodes

    def get(self, user: str) -> str:
        return self.nodes[user]


def test_users_on_other_nodes_are_handed_to_the_relay(
    spool, store, make_delivery, submit, run
) -> None:
    relay = FakeRelay()
    d = make_delivery(relay=relay)
    d.mailbox_map = FakeMap(
        {"alice@example.test": "be1", "bob@example.test": "be2", "carol@example.test": "be1"}
    )
    d.node_name = "be1"
    d.startService()
    qid = submit(["team@example.test", "carol@example.test"])
    run(d)
    # alice and carol live here; bob (through the alias) lives on be2.
    assert sorted(store.mailboxes) == ["alice@example.test", "carol@example.test"]
    assert relay.handed == [qid]
    message = spool.load(qid)
    assert message.state == "outbound"
    assert message.envelope.recipients == ["bob@example.test"]


def test_a_gateway_stores_nothing_locally(spool, store, make_delivery, submit, run) -> None:
    relay = FakeRelay()
    d = make_delivery(relay=relay)
    d.mailbox_map = FakeMap({"alice@example.test": "be1", "bob@example.test": "be2"})
    d.node_name = "gw1"
    d.startService()
    qid = submit(["alice@example.test", "bob@example.test"])
    run(d)
    assert store.mailboxes == {}
    assert spool.load(qid).envelope.recipients == ["alice@example.test", "bob@example.test"]


def test_without_a_relay_the_map_is_not_used(spool, store, make_delivery, submit, run) -> None:
    d = make_delivery()
    d.mailbox_map = FakeMap({"alice@example.test": "be2"})
    d.node_name = "be1"
    d.startService()
    submit(["alice@example.test"])
    run(d)
    assert list(store.mailboxes) == ["alice@example.test"]
