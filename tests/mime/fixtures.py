"""Real-world-shaped messages used by the mime tests (CRLF unless stated)."""

from __future__ import annotations


def crlf(text: str) -> bytes:
    """Encode ``text`` as UTF-8 with CRLF line breaks."""
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8")


def rfc3501_sample() -> bytes:
    """The message behind the ENVELOPE/BODY example of RFC 3501 §8 (3028 octets, 92 lines)."""
    header = crlf(
        "Date: Wed, 17 Jul 1996 02:23:25 -0700 (PDT)\n"
        "From: Terry Gray <gray@cac.washington.edu>\n"
        "Subject: IMAP4rev1 WG mtg summary and minutes\n"
        "To: imap@cac.washington.edu\n"
        "cc: minutes@CNRI.Reston.VA.US, John Klensin <KLENSIN@MIT.EDU>\n"
        "Message-Id: <B27397-0100000@cac.washington.edu>\n"
        "MIME-Version: 1.0\n"
        "Content-Type: TEXT/PLAIN; CHARSET=US-ASCII\n"
        "Content-Transfer-Encoding: 7BIT\n"
        "\n"
    )
    body = b"".join(b"x" * 31 + b"\r\n" for _ in range(91)) + b"y" * 23 + b"\r\n"
    assert len(body) == 3028
    return header + body


def rfc3501_multipart() -> bytes:
    """A message whose BODY is the multipart example of RFC 3501 §7.4.2."""
    part1 = b"".join(b"a" * 48 + b"\r\n" for _ in range(22)) + b"b" * 50 + b"\r\n"
    part2 = b"".join(b"Q" * 60 + b"\r\n" for _ in range(72)) + b"R" * 88 + b"\r\n"
    assert (len(part1), len(part2)) == (1152, 4554)
    return (
        crlf(
            "From: someone@example.org\n"
            "MIME-Version: 1.0\n"
            'Content-Type: MULTIPART/MIXED; BOUNDARY="----- =_aaaaaaaaaa0"\n'
            "\n"
            "This is a multi-part message.\n"
            "------- =_aaaaaaaaaa0\n"
            "Content-Type: TEXT/PLAIN; CHARSET=US-ASCII\n"
            "Content-Transfer-Encoding: 7BIT\n"
            "\n"
        )
        + part1
        + crlf(
            "\n------- =_aaaaaaaaaa0\n"
            'Content-Type: TEXT/PLAIN; CHARSET=US-ASCII; NAME="cc.diff"\n'
            "Content-ID: <960723163407.20117h@cac.washington.edu>\n"
            "Content-Description: Compiler diff\n"
            "Content-Transfer-Encoding: BASE64\n"
            "\n"
        )
        + part2
        + crlf("\n------- =_aaaaaaaaaa0--\n")
    )


MIXED_ALTERNATIVE = crlf(
    "Return-Path: <alice@example.com>\n"
    "Received: from mx.example.com (mx.example.com [192.0.2.1])\n"
    "\tby mail.example.org with ESMTPS id 4F1\n"
    "\tfor <bob@example.org>; Tue, 3 Mar 2026 10:00:00 +0100\n"
    "From: =?UTF-8?Q?Alice_M=C3=BCller?= <alice@example.com>\n"
    "To: Bob <bob@example.org>\n"
    "Subject: =?UTF-8?B?UXVhcnRhbHNiZXJpY2h0?= Q1\n"
    "Date: Tue, 3 Mar 2026 10:00:00 +0100\n"
    "Message-ID: <q1@example.com>\n"
    "MIME-Version: 1.0\n"
    'Content-Type: multipart/mixed; boundary="mixed-1"\n'
    "\n"
    "This is a multi-part message in MIME format.\n"
    "--mixed-1\n"
    'Content-Type: multipart/alternative; boundary="alt-1"\n'
    "\n"
    "--alt-1\n"
    "Content-Type: text/plain; charset=utf-8\n"
    "Content-Transfer-Encoding: quoted-printable\n"
    "\n"
    "Gr=C3=BC=C3=9Fe, Bob!\n"
    "Siehe Anhang.\n"
    "--alt-1\n"
    "Content-Type: text/html; charset=utf-8\n"
    "Content-Transfer-Encoding: 8bit\n"
    "\n"
    "<p>Grüße, Bob!</p>\n"
    "--alt-1--\n"
    "\n"
    "--mixed-1\n"
    'Content-Type: application/pdf; name="q1.pdf"\n'
    'Content-Disposition: attachment; filename="q1.pdf"; size=12\n'
    "Content-Transfer-Encoding: base64\n"
    "Content-Language: de, en\n"
    "Content-Location: http://example.com/\n"
    " reports/q1.pdf\n"
    "Content-MD5: Q2hlY2sgSW50ZWdyaXR5IQ==\n"
    "\n"
    "JVBERi0xLjQKJcfs\n"
    "--mixed-1--\n"
    "epilogue is ignored\n"
)

FORWARDED = crlf(
    "From: carol@example.net\n"
    "To: dave@example.org\n"
    "Subject: Fwd: report\n"
    "MIME-Version: 1.0\n"
    "Content-Type: multipart/mixed; boundary=outer\n"
    "\n"
    "--outer\n"
    "Content-Type: text/plain\n"
    "\n"
    "See below.\n"
    "--outer\n"
    "Content-Type: message/rfc822\n"
    "Content-Description: forwarded message\n"
    "\n"
    "From: Eve <eve@example.com>\n"
    "To: carol@example.net\n"
    "Subject: report\n"
    "Message-ID: <inner@example.com>\n"
    "Content-Type: multipart/alternative; boundary=inner\n"
    "\n"
    "--inner\n"
    "Content-Type: text/plain; charset=us-ascii\n"
    "\n"
    "plain\n"
    "--inner\n"
    "Content-Type: text/html; charset=us-ascii\n"
    "\n"
    "<b>html</b>\n"
    "--inner--\n"
    "--outer--\n"
)

RFC2231 = crlf(
    "From: x@example.com\n"
    "Content-Type: multipart/mixed; boundary=b\n"
    "\n"
    "--b\n"
    "Content-Type: application/octet-stream;\n"
    " name*0*=utf-8''%E6%8A%A5%E5%91%8A;\n"
    " name*1*=%20Q1;\n"
    ' name*2=".txt"\n'
    "Content-Disposition: attachment;\n"
    " filename*=iso-8859-1'de'Gr%FC%DFe.txt\n"
    "\n"
    "data\n"
    "--b\n"
    'Content-Type: text/plain; name*0="long "; name*1="name.txt"\n'
    'Content-Disposition: inline; filename="=?utf-8?b?w6TDtsO8LnR4dA==?="\n'
    "\n"
    "text\n"
    "--b--\n"
)
