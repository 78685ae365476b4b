"""The test server helper survives a port taken between choosing it and twistd binding it."""

from __future__ import annotations

import smtplib
import socket

from mailgw.testing.server import MailgwServer


def test_start_moves_listeners_off_a_port_taken_meanwhile(tmp_path) -> None:
    server = MailgwServer(tmp_path)
    taken = server.ports["mx"]
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", taken))
    holder.listen()
    try:
        server.start()
        assert server.ports["mx"] != taken
        assert f"tcp:{server.ports['mx']}:" in server.config_path.read_text()
        with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=10) as smtp:
            assert smtp.noop()[0] == 250
    finally:
        server.stop()
        holder.close()
