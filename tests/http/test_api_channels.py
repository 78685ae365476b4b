"""``POST /api/v1/channels/validate`` and ``PUT /api/v1/channels`` on the handler level: the
body becomes a fragment on top of the current pushed version (its other sections and rules
kept), what the config loader refuses is a 422 ``section:key: ...``, an unreachable state a
503, a garbled current version a 409, and the apply reports whether this node runs it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from mailgw.config import load
from mailgw.config.reload import ReloadableConfig
from mailgw.http.api.endpoints import AdminAPI, _ini_value
from mailgw.http.api.router import ApiError, Call
from mailgw.http.api.tokens import Token
from mailgw.state.embedded import EmbeddedState
from mailgw.state.unified import ConfigFollower, build_version, read_bundle, read_fragment

RULES = "rule to-sdn\n    match all\n    action route sdn\n"


class Node:
    """What the handlers use of ``service.Node``: config, gateway state, I/O pool (run
    inline), reactor, the config follower over a real ``ReloadableConfig``."""

    def __init__(self, path: Path) -> None:
        self.config = load(str(path))
        self.gateway_state: Any = EmbeddedState(self.config.server.data_dir)
        self.settings = ReloadableConfig(self.config)
        self.reactor = Clock()
        self.config_follower = ConfigFollower(
            self.gateway_state,
            self.settings,
            self.settings.reload,
            self.config.server.data_dir,
            "gw1",
            self.reactor,
        )

    def run_io(self, f: Any, *args: Any) -> defer.Deferred[Any]:
        return defer.maybeDeferred(f, *args)


@pytest.fixture
def node(tmp_path: Path) -> Node:
    path = tmp_path / "mailgw.ini"
    path.write_text(
        f"[server]\ndata_dir = {tmp_path / 'data'}\n"
        "[channel:sdn]\nkind = smarthost\nhosts = 127.0.0.1:2525\n"
    )
    return Node(path)


def call(body: dict[str, Any]) -> Call:
    return Call({}, {}, body, Token("t", "t", "admin", "", 0.0, None, None), "127.0.0.1")


def result(d: defer.Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the handler did not finish"
    if isinstance(out[0], Exception) or hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


PARTNER = {"name": "partner", "kind": "smarthost", "hosts": ["127.0.0.1:2526"], "tls": "none"}
ROUTE = {"name": "p", "recipient_domains": ["partner.test", ".partner.cn"], "channels": "partner"}


def test_json_values_are_spelled_as_in_the_file() -> None:
    assert _ini_value(True) == "yes" and _ini_value(False) == "no"
    assert _ini_value(3) == "3" and _ini_value(0.5) == "0.5"
    assert _ini_value(["a", "b"]) == "a b" and _ini_value("x") == "x"


def test_apply_keeps_the_other_pushed_sections_and_rules(node: Node, tmp_path: Path) -> None:
    before, _ = build_version(
        node.config, "[mx]\nmax_errors = 3\n[channel:old]\nkind = direct\n", "push", RULES
    )
    assert result(node.gateway_state.config_publish(before)) == 1
    api = AdminAPI(node)
    out = result(api.apply_channels(call({"channels": [PARTNER], "routes": [ROUTE]})))
    assert out["version"] == 2 and out["based_on"] == 1 and out["applied"] is True
    bundle = read_bundle(result(node.gateway_state.config_current())[1])
    parser = read_fragment(bundle["ini"], "v2")
    assert parser.sections() == ["mx", "channel:partner", "route:p"]
    assert parser.get("route:p", "recipient_domains") == "partner.test .partner.cn"
    assert bundle["rules"] == RULES
    running = node.settings.current
    assert [c.name for c in running.channels] == ["sdn", "partner"]
    assert running.mx.max_errors == 3 and running.routes[0].channels == "partner"
    assert running.routes[0].recipient_domains == ("partner.test", ".partner.cn")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"channels": [], "routes": [ROUTE]}, "route:p:channels: "),
        ({"channels": [{**PARTNER, "rate": "fast"}], "routes": []}, "channel:partner:rate: "),
        ({"channels": [{**PARTNER, "Bad-Key": 1}], "routes": []}, "channel:partner:Bad-Key: "),
        ({"channels": [{**PARTNER, "helo": "a\rb"}], "routes": []}, "channel:partner:helo: "),
        ({"channels": [], "routes": [ROUTE, ROUTE]}, "route:p: given twice"),
    ],
)
def test_what_the_loader_refuses_is_a_422(node: Node, body: dict[str, Any], message: str) -> None:
    api = AdminAPI(node)
    for handler in (api.validate_channels, api.apply_channels):
        with pytest.raises(ApiError) as e:
            result(handler(call(body)))
        assert e.value.status == 422 and e.value.message.startswith(message), e.value.message
    assert result(node.gateway_state.config_current()) is None


def test_pushed_rules_must_still_find_their_channels(node: Node) -> None:
    ini = "[channel:partner]\nkind = direct\n"
    blob, _ = build_version(node.config, ini, "push", RULES.replace("sdn", "partner"))
    node.gateway_state.config_publish(blob)
    # v1's rules route to the partner channel: a PUT without it is refused
    with pytest.raises(ApiError) as e:
        result(AdminAPI(node).apply_channels(call({"channels": [], "routes": []})))
    assert e.value.status == 422
    assert e.value.message == "pushed rules:3: route: unknown channel 'partner'"
    assert result(node.gateway_state.config_current())[0] == 1


def test_state_unreachable_and_garbled_version(node: Node) -> None:
    class Down:
        def config_current(self) -> defer.Deferred[Any]:
            return defer.fail(TimeoutError("redis unreachable"))

    node.gateway_state.config_publish(b"garbage")
    with pytest.raises(ApiError) as e:
        result(AdminAPI(node).validate_channels(call({"channels": [], "routes": []})))
    assert e.value.status == 409 and "v1" in e.value.message
    node.gateway_state = Down()
    with pytest.raises(ApiError) as e:
        result(AdminAPI(node).apply_channels(call({"channels": [], "routes": []})))
    assert e.value.status == 503 and "redis unreachable" in e.value.message


def test_a_version_this_node_refuses_is_published_but_not_applied(node: Node) -> None:
    api = AdminAPI(node)

    class Refusing:
        version = 0
        error = ""
        _busy = False

        def check(self) -> None:
            self.error = "pushed config v1 refused: the certificate does not load"

    node.config_follower = Refusing()  # type: ignore[assignment]
    out = result(api.apply_channels(call({"channels": [PARTNER], "routes": []})))
    assert out["version"] == 1 and out["applied"] is False and "refused" in out["error"]
