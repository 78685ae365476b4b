"""The admin and OA API of the real ``twistd mailgw``: tokens made with the CLI and used over
HTTP (401/403 by scope), every endpoint and its errors (400/404/405/409/413/415), an OA message
that arrives in a mailbox over IMAP and one a rule rejects, rules applied live, channels and
routes pushed through the unified config (a message then leaves through the new channel to an
SMTP sink; a refused body changes nothing), and signed webhooks received by a small HTTP server
in the test, retried while it is down (also across a mailgw restart). Schemathesis runs against /api/openapi.json (no 5xx, responses as documented).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import imaplib
import json
import smtplib
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailgw.testing.server import MailgwServer, free_port, wait_for_port
from tests.integration.conftest import make_server
from tests.integration.helpers import wait_until

ADMIN_FILE_TOKEN = "file-token-for-the-admin-api-0123456789"
SECRET = "webhook-secret-0123456789abcdef"
RULES = """
rule no-forbidden
    match subject FORBIDDEN
    action reject 554 5.7.1 "Forbidden subject"

rule review
    match subject REVIEW-ME
    action quarantine "held for review"
"""


class Rejecter:
    """An SMTP server that refuses every recipient with 550 5.1.1 (the relay bounces)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.session, args=(conn,), daemon=True).start()

    @staticmethod
    def session(conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as lines:
            conn.sendall(b"220 rejecter ESMTP\r\n")
            for line in lines:
                verb = line[:4].upper()
                if verb == b"QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                if verb == b"RCPT":
                    conn.sendall(b"550 5.1.1 no such user here\r\n")
                elif verb == b"DATA":
                    conn.sendall(b"554 5.5.1 no valid recipients\r\n")
                else:
                    conn.sendall(b"250 ok\r\n")

    def close(self) -> None:
        self.sock.close()


class Sink:
    """An SMTP server that accepts every message and keeps it (``messages``): a smarthost
    whose traffic shows which channel a message left through."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.messages: list[bytes] = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.session, args=(conn,), daemon=True).start()

    def session(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as lines:
            conn.sendall(b"220 sink ESMTP\r\n")
            for line in lines:
                verb = line[:4].upper()
                if verb == b"QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                if verb == b"DATA":
                    conn.sendall(b"354 go on\r\n")
                    data = b""
                    for body_line in lines:
                        if body_line == b".\r\n":
                            break
                        data += body_line
                    self.messages.append(data)
                conn.sendall(b"250 ok\r\n")

    def close(self) -> None:
        self.sock.close()


class Receiver:
    """A webhook receiver on a free port: records each POST (headers, body); ``up`` False:
    answers 503."""

    def __init__(self) -> None:
        self.port = free_port()
        self.posts: list[tuple[dict[str, str], bytes]] = []
        self.refused = 0
        self.up = True
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if not receiver.up:
                    receiver.refused += 1
                    self.send_response(503)
                    self.end_headers()
                    return
                receiver.posts.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def events(self, name: str) -> list[dict[str, Any]]:
        return [json.loads(b) for _, b in self.posts if json.loads(b)["event"] == name]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def verify(headers: dict[str, str], body: bytes) -> bool:
    """The receiver's check of X-Mailgw-Signature (as in docs/api.md)."""
    timestamp = headers["x-mailgw-timestamp"]
    expected = hmac.new(SECRET.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return hmac.compare_digest("sha256=" + expected.hexdigest(), headers["x-mailgw-signature"])


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def rejecter() -> Iterator[Rejecter]:
    r = Rejecter()
    yield r
    r.close()


@pytest.fixture(scope="module")
def node(
    tmp_path_factory: pytest.TempPathFactory,
    selfsigned: tuple[Path, Path],
    receiver: Receiver,
    rejecter: Rejecter,
) -> Iterator[MailgwServer]:
    cert, key = selfsigned
    tmp = tmp_path_factory.mktemp("api")
    (tmp / "admin.token").write_text(ADMIN_FILE_TOKEN + "\n")
    (tmp / "webhook.secret").write_text(SECRET + "\n")
    (tmp / "rules.txt").write_text(RULES)
    port = free_port()
    server = make_server(
        tmp / "node",
        {
            "tls": {"certificate": str(cert), "private_key": str(key)},
            "submission": {
                "enabled": "yes",
                "listen": f"tcp:{free_port()}:interface=127.0.0.1",
                "listen_tls": f"tcp:{free_port()}:interface=127.0.0.1",
            },
            "http": {
                "enabled": "yes",
                "listen": f"tcp:{port}:interface=127.0.0.1",
                "listen_tls": f"tcp:{free_port()}:interface=127.0.0.1",
                "admin_token_file": str(tmp / "admin.token"),
                "allow": "10.0.0.0/8",  # not loopback: the tests' requests need a token
            },
            "policy": {"rules_file": str(tmp / "rules.txt")},
            "relay": {"enabled": "yes", "retry_schedule": "1h"},
            "channel:out": {"kind": "smarthost", "hosts": f"127.0.0.1:{free_port()}"},
            "channel:rejecter": {"kind": "smarthost", "hosts": f"127.0.0.1:{rejecter.port}"},
            "route:rejected": {"recipient_domains": "reject.test", "channels": "rejecter"},
            "route:stuck": {"recipient_domains": "remote.test", "channels": "out"},
            "api": {"oa_sender": "alice@example.test", "max_body_size": "2M"},
            "webhooks": {
                "urls": f"http://127.0.0.1:{receiver.port}/hook",
                "secret_file": str(tmp / "webhook.secret"),
                "retry_initial": "200ms",
                "retry_max": "1s",
            },
        },
    )
    server.http_port = port  # type: ignore[attr-defined]
    wait_for_port("127.0.0.1", port, proc=server.proc)
    yield server
    server.stop()


def call(
    node: MailgwServer,
    method: str,
    path: str,
    token: str | None = None,
    body: Any = None,
    raw: bytes | None = None,
    content_type: str = "application/json",
) -> tuple[int, dict[str, str], Any]:
    url = f"http://127.0.0.1:{node.http_port}{path}"  # type: ignore[attr-defined]
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            status, headers, text = r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        status, headers, text = e.code, dict(e.headers), e.read()
    assert headers.get("Content-Type", "").startswith("application/json"), (status, text)
    return status, headers, json.loads(text) if text else None


def submit(node: MailgwServer, token: str, to: str, subject: str) -> Any:
    """``POST /api/v1/messages`` of a one-line text message; its 202 body (the queue ID)."""
    status, _, body = call(
        node, "POST", "/api/v1/messages", token, {"to": to, "subject": subject, "text": "x"}
    )
    assert status == 202, body
    return body


def create_token(node: MailgwServer, scope: str, *extra: str) -> str:
    out = node.cli("token", "create", "--scope", scope, "--name", f"test-{scope}", *extra)
    return out.stdout.splitlines()[0]


@pytest.fixture(scope="module")
def tokens(node: MailgwServer) -> dict[str, str]:
    return {s: create_token(node, s) for s in ("admin", "read", "send")}


def test_tokens_and_scopes(node: MailgwServer, tokens: dict[str, str]) -> None:
    status, headers, body = call(node, "GET", "/api/v1/domains")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert body["error"]["code"] == "unauthorized"
    assert call(node, "GET", "/api/v1/domains", "mgw_00000000_" + "x" * 43)[0] == 401
    assert call(node, "GET", "/api/v1/domains", "garbage")[0] == 401
    assert call(node, "GET", "/api/v1/domains", tokens["read"])[2] == {"domains": ["example.test"]}
    assert call(node, "GET", "/api/v1/domains", ADMIN_FILE_TOKEN)[0] == 200
    status, _, body = call(node, "POST", "/api/v1/domains", tokens["read"], {"name": "x.test"})
    assert status == 403 and body["error"]["code"] == "forbidden"
    assert call(node, "GET", "/api/v1/domains", tokens["send"])[0] == 403
    # revoked at once
    temp = create_token(node, "read", "--expires", "1h")
    assert call(node, "GET", "/api/v1/stats", temp)[0] == 200
    listed = json.loads(node.cli("token", "list", "--json").stdout)
    tid = next(t["id"] for t in listed if t["expires"] and not t["revoked"])
    node.cli("token", "revoke", tid)
    assert call(node, "GET", "/api/v1/stats", temp)[0] == 401
    assert node.cli("token", "revoke", tid, check=False).returncode == 1
    # the token file stores hashes only
    db = (node.data_dir / "api_tokens.sqlite").read_bytes()
    assert temp.encode() not in db and tokens["admin"].encode() not in db


def test_tracking_with_a_read_token(node: MailgwServer, tokens: dict[str, str]) -> None:
    """A helpdesk tool's read token looks up a message's timeline; a send token cannot; no
    token from an address outside [http] allow is 401; the answer is ``mailgw track --json``'s."""
    read = tokens["read"]
    body = submit(node, tokens["send"], "bob@example.test", "track me")
    qid = body["queue_id"]

    def delivered() -> Any:
        status, _, body = call(node, "GET", f"/api/v1/tracking?q={qid}&since=1h", read)
        assert status == 200, body
        kinds = [e["kind"] for m in body["messages"] for e in m["events"]]
        return body if "delivered" in kinds else None  # the events are written in batches

    body = wait_until(delivered, what="the delivered event over the API")
    [m] = body["messages"]
    assert body["query"] == qid and body["until"] is None
    assert abs(body["since"] - (time.time() - 3600)) < 60
    assert m["queue_id"] == qid and m["recipients"] == ["bob@example.test"]
    assert [e["kind"] for e in m["events"]][0] == "received" and m["status"] == "delivered"
    cli = json.loads(node.cli("track", "--json", qid).stdout)
    assert [x["queue_id"] for x in cli["messages"]] == [qid]
    assert cli["messages"][0]["events"][:2] == m["events"][:2]
    by_address = call(node, "GET", "/api/v1/tracking?q=bob%40example.test", tokens["admin"])
    assert qid in [x["queue_id"] for x in by_address[2]["messages"]]
    assert call(node, "GET", f"/api/v1/tracking?q={qid}", ADMIN_FILE_TOKEN)[0] == 200
    status, _, body = call(node, "GET", f"/api/v1/tracking?q={qid}", tokens["send"])
    assert status == 403 and body["error"]["code"] == "forbidden"
    status, headers, body = call(node, "GET", f"/api/v1/tracking?q={qid}")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert body["error"]["code"] == "unauthorized"
    status, _, body = call(node, "GET", f"/api/v1/tracking?q={qid}&since=last+tuesday", read)
    assert status == 400 and "expected a time" in body["error"]["message"]
    assert call(node, "GET", "/api/v1/tracking", read)[0] == 400
    status, headers, _ = call(node, "DELETE", f"/api/v1/tracking?q={qid}", tokens["admin"])
    assert status == 405 and headers["Allow"] == "GET, HEAD"


def test_directory_endpoints(node: MailgwServer, tokens: dict[str, str]) -> None:
    admin = tokens["admin"]
    assert call(node, "POST", "/api/v1/domains", admin, {"name": "new.test"})[0] == 201
    assert call(node, "POST", "/api/v1/domains", admin, {"name": "new.test"})[0] == 409
    assert call(node, "POST", "/api/v1/domains", admin, {"name": "bad domain!"})[0] == 400
    assert call(node, "POST", "/api/v1/domains", admin, {"nom": "x"})[0] == 400
    assert call(node, "POST", "/api/v1/domains", admin, raw=b"{not json")[0] == 400
    assert (
        call(node, "POST", "/api/v1/domains", admin, raw=b"name=x", content_type="text/plain")[0]
        == 415
    )
    assert (
        call(node, "POST", "/api/v1/domains", admin, raw=b'"' + b"a" * 3_000_000 + b'"')[0] == 413
    )
    user = {"address": "carol@new.test", "password": "carol password", "quota": "1G"}
    status, _, body = call(node, "POST", "/api/v1/users", admin, user)
    assert status == 201 and body == {"name": "carol@new.test", "quota": 1 << 30, "enabled": True}
    assert call(node, "POST", "/api/v1/users", admin, user)[0] == 409
    bad = {**user, "address": "dave@nowhere.test"}
    assert call(node, "POST", "/api/v1/users", admin, bad)[0] == 400
    assert call(node, "POST", "/api/v1/users", admin, {**user, "quota": "lots"})[0] == 400
    assert call(node, "GET", "/api/v1/users/carol@new.test", tokens["read"])[0] == 200
    assert call(node, "GET", "/api/v1/users/nobody@new.test", tokens["read"])[0] == 404
    assert call(node, "GET", "/api/v1/users?domain=new.test", tokens["read"])[2]["users"] == [body]
    assert call(node, "GET", "/api/v1/users?domain=nowhere.test", tokens["read"])[0] == 404
    s, _, b = call(node, "POST", "/api/v1/users/carol@new.test/disable", admin)
    assert s == 200 and b["enabled"] is False
    assert call(node, "POST", "/api/v1/users/carol@new.test/enable", admin)[2]["enabled"]
    s, _, b = call(node, "PUT", "/api/v1/users/carol@new.test/quota", admin, {"quota": "none"})
    assert b["quota"] == 0
    assert (
        call(
            node,
            "PUT",
            "/api/v1/users/carol@new.test/password",
            admin,
            {"password": "new carol pw"},
        )[0]
        == 200
    )
    imap = imaplib.IMAP4("127.0.0.1", node.ports["imap"])
    imap.starttls()
    imap.login("carol@new.test", "new carol pw")
    imap.logout()
    assert (
        call(
            node, "PUT", "/api/v1/users/nobody@new.test/password", admin, {"password": "xxxxxxxxxx"}
        )[0]
        == 404
    )
    a = {"source": "info@new.test", "destination": "carol@new.test"}
    assert call(node, "POST", "/api/v1/aliases", admin, a)[0] == 201
    assert call(node, "POST", "/api/v1/aliases", admin, a)[0] == 409
    assert a in call(node, "GET", "/api/v1/aliases", tokens["read"])[2]["aliases"]
    assert call(node, "DELETE", "/api/v1/aliases/info@new.test", admin)[2] == {"removed": 1}
    assert call(node, "DELETE", "/api/v1/aliases/info@new.test", admin)[0] == 404
    read = tokens["read"]
    s, _, b = call(node, "POST", "/api/v1/groups", admin, {"name": "Finance"})
    assert s == 201 and b == {"name": "finance"}
    assert call(node, "POST", "/api/v1/groups", admin, {"name": "finance"})[0] == 409
    assert call(node, "POST", "/api/v1/groups", admin, {"name": "a b"})[0] == 400
    member = "/api/v1/groups/finance/members/carol@new.test"
    s, _, b = call(node, "PUT", "/api/v1/groups/finance/members/Carol@new.test", admin)
    assert s == 200 and b == {"group": "finance", "user": "carol@new.test"}
    assert call(node, "PUT", member, admin)[0] == 409
    assert call(node, "PUT", member, read)[0] == 403
    assert call(node, "PUT", "/api/v1/groups/sales/members/carol@new.test", admin)[0] == 404
    assert call(node, "PUT", "/api/v1/groups/finance/members/nobody@new.test", admin)[0] == 404
    groups = call(node, "GET", "/api/v1/groups", read)[2]["groups"]
    assert {"name": "finance", "members": 1} in groups
    assert call(node, "GET", "/api/v1/groups/finance/members", read)[2] == {
        "members": ["carol@new.test"]
    }
    assert call(node, "GET", "/api/v1/groups/sales/members", read)[0] == 404
    assert call(node, "DELETE", member, admin)[2] == {"group": "finance", "user": "carol@new.test"}
    assert call(node, "DELETE", member, admin)[0] == 404
    assert call(node, "DELETE", "/api/v1/groups/finance", admin)[2] == {"members": 0}
    assert call(node, "DELETE", "/api/v1/groups/finance", admin)[0] == 404
    assert call(node, "DELETE", "/api/v1/domains/new.test", admin)[0] == 409
    assert call(node, "DELETE", "/api/v1/users/carol@new.test", admin)[0] == 200
    assert call(node, "DELETE", "/api/v1/domains/new.test?force=true", admin)[0] == 200
    assert call(node, "DELETE", "/api/v1/domains/new.test", admin)[0] == 404
    assert call(node, "DELETE", "/api/v1/domains/x?force=maybe", admin)[0] == 400
    # paths and methods
    status, headers, _ = call(node, "PATCH", "/api/v1/domains", admin)
    assert status == 405 and headers["Allow"] == "GET, HEAD, POST"
    assert call(node, "GET", "/api/v1/nothing", admin)[0] == 404


def test_queue_quarantine_channels_dr_stats(node: MailgwServer, tokens: dict[str, str]) -> None:
    read, admin = tokens["read"], tokens["admin"]
    # a message for a remote domain stays queued (the smarthost does not answer)
    body = submit(node, tokens["send"], "someone@remote.test", "queued")
    qid = body["queue_id"]

    def state() -> str:
        return str(call(node, "GET", f"/api/v1/queue/{qid}", read)[2]["state"])

    wait_until(lambda: state() in ("retry", "deferred"), what="the message deferred")
    rows = call(node, "GET", "/api/v1/queue?state=retry", read)[2]["messages"]
    assert [r["queue_id"] for r in rows] == [qid]
    assert "Subject: queued" in call(node, "GET", f"/api/v1/queue/{qid}", read)[2]["headers"]
    assert call(node, "POST", f"/api/v1/queue/{qid}/hold", read)[0] == 403
    assert call(node, "POST", f"/api/v1/queue/{qid}/hold", admin)[2]["was"] == "retry"
    assert call(node, "POST", f"/api/v1/queue/{qid}/hold", admin)[0] == 409
    assert call(node, "POST", f"/api/v1/queue/{qid}/retry", admin)[0] == 409
    assert call(node, "POST", f"/api/v1/queue/{qid}/release", admin)[2]["state"] == "retry"
    assert call(node, "POST", f"/api/v1/queue/{qid}/release", admin)[0] == 409
    wait_until(lambda: state() == "retry", what="back in retry")
    assert call(node, "POST", f"/api/v1/queue/{qid}/retry", admin)[2] == {"flushed": [qid]}
    wait_until(lambda: state() == "retry", what="retried")
    assert call(node, "DELETE", f"/api/v1/queue/{qid}", admin)[2]["was"] == "retry"
    assert call(node, "GET", f"/api/v1/queue/{qid}", read)[0] == 404
    assert "deleted" in node.cli("track", qid).stdout
    assert call(node, "GET", "/api/v1/queue?state=bogus", read)[0] == 400
    assert call(node, "GET", "/api/v1/queue/NOTANID", read)[0] == 404
    assert call(node, "POST", "/api/v1/queue/0000000000000000/hold", admin)[0] == 404
    assert call(node, "GET", "/api/v1/quarantine", read)[2] == {"messages": []}
    assert call(node, "GET", "/api/v1/quarantine/nope", read)[0] == 404
    assert call(node, "DELETE", "/api/v1/quarantine/0000000000000000", admin)[0] == 404
    status, _, body = call(node, "GET", "/api/v1/channels", read)
    assert status == 200 and [c["name"] for c in body["channels"]] == ["out", "rejecter"]
    assert call(node, "GET", "/api/v1/channels/out", read)[2]["kind"] == "smarthost"
    assert call(node, "GET", "/api/v1/channels/nope", read)[0] == 404
    status, _, body = call(node, "GET", "/api/v1/dr", read)
    assert status == 404 and body["error"]["code"] == "not_configured"
    status, _, body = call(node, "GET", "/api/v1/stats", read)
    assert status == 200 and body["domains"] == 1 and body["users"] >= 2
    assert body["store"]["tier1"]["messages"] >= 0 and body["queue"]["retry"] == 0


def test_rules_get_validate_apply(node: MailgwServer, tokens: dict[str, str]) -> None:
    read, admin = tokens["read"], tokens["admin"]
    status, _, body = call(node, "GET", "/api/v1/rules", read)
    assert status == 200 and "no-forbidden" in body["text"] and len(body["rules"]) == 2
    status, _, body = call(node, "POST", "/api/v1/rules/validate", read, {"text": "rule x\n"})
    assert status == 200 and body["valid"] is False and body["line"] == 1
    assert call(node, "PUT", "/api/v1/rules", read, {"text": RULES})[0] == 403
    status, _, body = call(node, "PUT", "/api/v1/rules", admin, {"text": "garbage here\n"})
    assert status == 400 and body["error"]["code"] == "invalid_rules"
    new = (
        RULES
        + '\nrule no-secret\n    match subject SECRET\n    action reject 550 5.7.1 "No secrets"\n'
    )
    status, _, body = call(node, "PUT", "/api/v1/rules", admin, {"text": new})
    assert status == 200 and body["valid"] and len(body["rules"]) == 3, body
    status, _, body = call(
        node,
        "POST",
        "/api/v1/messages",
        tokens["send"],
        {"to": "bob@example.test", "subject": "SECRET plans", "text": "x"},
    )
    assert status == 422 and "No secrets" in body["error"]["message"]


@pytest.fixture(scope="module")
def sink() -> Iterator[Sink]:
    s = Sink()
    yield s
    s.close()


def test_channels_validate_and_apply_through_the_unified_config(
    node: MailgwServer, tokens: dict[str, str], sink: Sink
) -> None:
    read, admin = tokens["read"], tokens["admin"]
    partner = {
        "name": "partner",
        "kind": "smarthost",
        "hosts": [f"127.0.0.1:{sink.port}"],
        "tls": "none",
        "concurrency": 2,
    }
    route = {"name": "to-partner", "recipient_domains": ["partner.test"], "channels": "partner"}
    good = {"channels": [partner], "routes": [route]}
    assert call(node, "PUT", "/api/v1/channels", read, good)[0] == 403
    assert call(node, "POST", "/api/v1/channels/validate", read, good)[0] == 403
    bad_bodies = [
        ({"channels": [], "routes": [route]}, "route:to-partner:channels: "),
        ({"channels": [{**partner, "hostz": "x"}], "routes": []}, "channel:partner:hostz: unknown"),
        (
            {"channels": [{**partner, "concurrency": 0}], "routes": []},
            "channel:partner:concurrency",
        ),
        ({"channels": [{**partner, "tls": "maybe"}], "routes": []}, "channel:partner:tls: "),
        ({"channels": [partner, partner], "routes": []}, "channel:partner: given twice"),
        ({"channels": [{**partner, "helo": "a\nb"}], "routes": []}, "channel:partner:helo: "),
    ]
    for body, message in bad_bodies:
        for method, path in (("POST", "/api/v1/channels/validate"), ("PUT", "/api/v1/channels")):
            status, _, answer = call(node, method, path, admin, body)
            assert status == 422, (body, answer)
            assert answer["error"]["code"] == "invalid_config"
            assert answer["error"]["message"].startswith(message), answer
    # a body that does not match the schema is a 400, as everywhere
    assert call(node, "PUT", "/api/v1/channels", admin, {"channels": []})[0] == 400
    # nothing changed: no version published, the running channels as before
    assert json.loads(node.cli("config", "status", "--json").stdout)["current"] == 0
    names = [c["name"] for c in call(node, "GET", "/api/v1/channels", read)[2]["channels"]]
    assert names == ["out", "rejecter"]

    status, _, body = call(node, "POST", "/api/v1/channels/validate", admin, good)
    assert status == 200 and body["valid"] and body["channels"] == ["partner"], body
    assert "version" not in body and body["based_on"] == 0
    assert json.loads(node.cli("config", "status", "--json").stdout)["current"] == 0

    status, _, body = call(node, "PUT", "/api/v1/channels", admin, good)
    assert status == 200, body
    assert body["version"] == 1 and body["applied"] is True and body["routes"] == ["to-partner"]
    assert "applied pushed config v1" in node.log()
    assert json.loads(node.cli("config", "status", "--json").stdout)["current"] == 1
    status, _, row = call(node, "GET", "/api/v1/channels/partner", read)
    assert status == 200 and row["kind"] == "smarthost"

    body = submit(node, tokens["send"], "someone@partner.test", "via the partner channel")
    qid = body["queue_id"].encode()
    got = wait_until(
        lambda: [m for m in sink.messages if qid in m], what="the message at the partner sink"
    )
    assert b"Subject: via the partner channel" in got[0]
    assert "partner" in node.cli("track", body["queue_id"]).stdout

    # a refused PUT after it leaves v1 running
    status, _, answer = call(
        node, "PUT", "/api/v1/channels", admin, {"channels": [], "routes": [route]}
    )
    assert status == 422
    assert json.loads(node.cli("config", "status", "--json").stdout)["current"] == 1
    assert call(node, "GET", "/api/v1/channels/partner", read)[0] == 200


def test_oa_message_arrives_and_rules_apply(
    node: MailgwServer, tokens: dict[str, str], receiver: Receiver
) -> None:
    send = tokens["send"]
    attachment = base64.b64encode("报告内容".encode()).decode()
    message = {
        "to": ["Bob <bob@example.test>"],
        "subject": "审批通知 approval",
        "text": "Please approve.",
        "html": "<p>Please <b>approve</b>.</p>",
        "attachments": [
            {"filename": "报告.txt", "content_type": "text/plain", "content": attachment}
        ],
    }
    status, _, body = call(node, "POST", "/api/v1/messages", send, message)
    assert status == 202, body
    queue_id = body["queue_id"]
    imap = imaplib.IMAP4("127.0.0.1", node.ports["imap"])
    imap.starttls()
    imap.login("bob@example.test", "bob password")

    def arrived() -> bytes | None:
        imap.select("INBOX")
        _, data = imap.search(None, "ALL")
        for n in data[0].split():
            raw = imap.fetch(n, "(RFC822)")[1][0][1]
            if queue_id.encode() in raw:
                return raw
        return None

    raw = wait_until(arrived, what="the OA message in bob's INBOX")
    imap.logout()
    assert b"From: alice@example.test" in raw and b"with api" in raw
    import email
    import email.policy

    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed["Subject"] == "审批通知 approval"
    (att,) = list(parsed.iter_attachments())
    assert att.get_filename() == "报告.txt" and att.get_payload(decode=True) == "报告内容".encode()
    # a rule rejects it: the SMTP reply in a JSON error
    status, _, body = call(
        node,
        "POST",
        "/api/v1/messages",
        send,
        {"to": "bob@example.test", "subject": "FORBIDDEN", "text": "x"},
    )
    assert status == 422 and body["error"]["message"].startswith("554 5.7.1")
    # bad input
    assert call(node, "POST", "/api/v1/messages", send, {"to": "bob@example.test"})[0] == 400
    assert (
        call(node, "POST", "/api/v1/messages", send, {"to": "bob@example.test", "subject": "s"})[0]
        == 400
    )
    assert call(
        node, "POST", "/api/v1/messages", send, {"to": "nobody", "subject": "s", "text": "t"}
    )[0] in (400, 422)
    assert (
        call(
            node,
            "POST",
            "/api/v1/messages",
            send,
            {"to": "bob@example.test", "subject": "a\nBcc: x@y", "text": "t"},
        )[0]
        == 400
    )
    bad_att = {**message, "attachments": [{"filename": "a", "content": "!!!"}]}
    assert call(node, "POST", "/api/v1/messages", send, bad_att)[0] == 400
    # the delivery to bob was a webhook event, signed
    posts = wait_until(
        lambda: [p for p in receiver.posts if json.loads(p[1])["queue_id"] == queue_id],
        what="the delivered webhook",
    )
    headers, payload = posts[0]
    assert verify(headers, payload)
    event = json.loads(payload)
    assert event["event"] == "message.delivered" == headers["x-mailgw-event"]
    assert event["data"]["recipient"] == "bob@example.test"
    assert not verify({**headers, "x-mailgw-timestamp": "1"}, payload)


def test_quarantine_failure_events_and_token_sender(
    node: MailgwServer, tokens: dict[str, str], receiver: Receiver
) -> None:
    read, admin = tokens["read"], tokens["admin"]
    review = {"to": "bob@example.test", "subject": "REVIEW-ME now", "text": "x"}
    ids = []
    for _ in range(2):
        status, _, body = call(node, "POST", "/api/v1/messages", tokens["send"], review)
        assert status == 202, body
        ids.append(body["queue_id"])
    listed = call(node, "GET", "/api/v1/quarantine", read)[2]["messages"]
    assert sorted(m["id"] for m in listed) == sorted(ids)
    status, _, shown = call(node, "GET", f"/api/v1/quarantine/{ids[0]}", read)
    assert shown["reason"] == "held for review" and "Subject: REVIEW-ME now" in shown["headers"]
    assert call(node, "POST", f"/api/v1/quarantine/{ids[0]}/release", read)[0] == 403
    assert call(node, "POST", f"/api/v1/quarantine/{ids[0]}/release", admin)[0] == 200
    assert call(node, "POST", f"/api/v1/quarantine/{ids[0]}/release", admin)[0] == 404
    assert call(node, "DELETE", f"/api/v1/quarantine/{ids[1]}", admin)[2] == {"ok": True}
    assert call(node, "GET", "/api/v1/quarantine", read)[2] == {"messages": []}
    wait_until(
        lambda: (
            receiver.events("message.delivered")
            and any(e["queue_id"] == ids[0] for e in receiver.events("message.delivered"))
        ),
        what="the released message delivered",
    )

    def quarantine_events() -> dict[str, Any]:
        return {e["queue_id"]: e for e in receiver.events("message.quarantined")}

    quarantined = wait_until(
        lambda: set(ids) <= set(quarantine_events()) and quarantine_events(),
        what="the quarantined webhooks",
    )
    assert quarantined[ids[0]]["data"] == {"check": "rules", "reason": "held for review"}
    # a remote server refuses the recipient: the relay bounces, a failed event
    body = submit(node, tokens["send"], "x@reject.test", "doomed")
    failed = wait_until(
        lambda: [e for e in receiver.events("message.failed") if e["queue_id"] == body["queue_id"]],
        what="the failed webhook",
    )
    assert failed[0]["data"]["recipients"] == ["x@reject.test"]
    assert "5.1.1" in failed[0]["data"]["reason"] and failed[0]["data"]["cause"] == "bounced"
    # a send token with its own sender (who must be allowed to send as it)
    bob = create_token(node, "send", "--sender", "bob@example.test")
    body = submit(node, bob, "alice@example.test", "hi")
    status, _, body = call(
        node, "GET", f"/api/v1/queue/{body['queue_id']}", read
    )  # delivered already, or still queued: either way from bob
    assert status == 404 or body["sender"] == "bob@example.test"
    assert (
        "bob@example.test"
        in node.cli(
            "track", body.get("queue_id", "x") if status == 200 else "bob@example.test"
        ).stdout
    )


def test_webhooks_retried_while_the_receiver_is_down_and_across_a_restart(
    node: MailgwServer, receiver: Receiver
) -> None:
    def outbox() -> Any:
        return call(node, "GET", "/api/v1/stats", ADMIN_FILE_TOKEN)[2]["webhooks"]

    wait_until(lambda: outbox() == {"pending": 0, "failing": 0}, what="earlier events sent")
    receiver.up = False
    down_at = time.time()
    with smtplib.SMTP("127.0.0.1", node.ports["mx"]) as s:
        s.sendmail("x@remote.test", ["alice@example.test"], b"Subject: w1\r\n\r\nhi\r\n")
    wait_until(lambda: receiver.refused >= 2, what="two refused attempts")
    assert outbox()["failing"] == 1
    node.stop()
    node.start()
    wait_for_port("127.0.0.1", node.http_port, proc=node.proc)  # type: ignore[attr-defined]
    refused = receiver.refused
    wait_until(lambda: receiver.refused > refused, what="a retry after the restart")
    receiver.up = True

    def w1() -> list[tuple[dict[str, str], bytes]]:
        return [
            (h, b)
            for h, b in receiver.posts
            if json.loads(b)["event"] == "message.delivered"
            and json.loads(b)["time"] >= down_at
            and json.loads(b)["data"]["recipient"] == "alice@example.test"
        ]

    got = wait_until(w1, what="the webhook after the receiver came back")
    assert verify(*got[0])
    wait_until(lambda: outbox() == {"pending": 0, "failing": 0}, what="an empty outbox")
    assert len(w1()) == 1  # sent once, then removed from the outbox
    deliveries = [h["x-mailgw-delivery"] for h, _ in receiver.posts]
    assert len(deliveries) == len(set(deliveries))


def test_openapi_document_describes_every_route(node: MailgwServer) -> None:
    url = f"http://127.0.0.1:{node.http_port}/api/openapi.json"  # type: ignore[attr-defined]
    with urllib.request.urlopen(url, timeout=15) as r:
        doc = json.loads(r.read())
    assert doc["openapi"].startswith("3.")
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    ops = {(m, p) for p, item in doc["paths"].items() for m in item}
    assert ("post", "/api/v1/messages") in ops and ("put", "/api/v1/rules") in ops
    assert ("put", "/api/v1/channels") in ops and ("post", "/api/v1/channels/validate") in ops
    assert ("get", "/api/v1/tracking") in ops
    tracking = doc["paths"]["/api/v1/tracking"]["get"]
    assert tracking["x-scope"] == "read" and {"400", "401", "403", "503"} <= set(
        tracking["responses"]
    )
    assert [p["name"] for p in tracking["parameters"]] == ["q", "since", "until"]
    assert len(ops) == 41


def test_schemathesis_finds_no_server_error(
    node: MailgwServer, tokens: dict[str, str], tmp_path: Path
) -> None:
    import subprocess
    import sys

    url = f"http://127.0.0.1:{node.http_port}/api/openapi.json"  # type: ignore[attr-defined]
    st = Path(sys.executable).with_name("schemathesis")
    result = subprocess.run(
        [
            str(st),
            "run",
            url,
            "--url",
            f"http://127.0.0.1:{node.http_port}",  # type: ignore[attr-defined]
            "-H",
            f"Authorization: Bearer {tokens['admin']}",
            "--max-examples",
            "15",
            "--checks",
            "not_a_server_error,status_code_conformance,"
            "content_type_conformance,response_schema_conformance",
            "--seed",
            "1",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    out = result.stdout
    start = out.find("FAILURES")
    assert result.returncode == 0, out[start : start + 8000] + result.stderr[-2000:]
    assert "Server error" not in out
    assert "Tested: 41" in out, out[-3000:]  # every operation, DELETE and PUT /rules too
