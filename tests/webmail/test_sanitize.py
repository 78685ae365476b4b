"""HTML mail through nh3 and plain-text links: the payloads of Roundcube's XSS advisories and
the remote-content cases."""

from __future__ import annotations

import pytest

from mailgw.webmail.sanitize import clean_html, linkify

PAYLOADS = [
    # CVE-2023-5631 / 2024-37383 style: SVG animate and set with event handlers.
    '<svg><animate onbegin="alert(1)" attributeName="x" dur="1s"></svg>',
    '<svg><set attributeName="onmouseover" to="alert(1)"/></svg>',
    '<svg><a><animate attributeName="href" values="javascript:alert(1)"/><text>x</text></a></svg>',
    # javascript: and data: links, with case and whitespace tricks.
    '<a href="javascript:alert(1)">x</a>',
    '<a href=" JaVaScRiPt:alert(1)">x</a>',
    '<a href="java&#x09;script:alert(1)">x</a>',
    '<a href="data:text/html,<script>alert(1)</script>">x</a>',
    '<a href="vbscript:msgbox(1)">x</a>',
    # Event handlers, scripts, style sheets, frames, forms, meta refresh, base.
    "<img src=x onerror=alert(1)>",
    "<body onload=alert(1)>",
    "<script>alert(1)</script>",
    "<style>@import 'http://evil.test/x.css';</style>",
    "<link rel=stylesheet href=http://evil.test/x.css>",
    '<iframe src="javascript:alert(1)"></iframe>',
    '<object data="http://evil.test/x.swf"></object>',
    '<embed src="http://evil.test/x.swf">',
    '<form action="http://evil.test"><button>go</button></form>',
    '<meta http-equiv="refresh" content="0;url=http://evil.test">',
    '<base href="http://evil.test/">',
    # Mutation XSS through foreign content.
    "<math><mtext><table><mglyph><style><img src=x onerror=alert(1)>",
    '<noscript><p title="</noscript><img src=x onerror=alert(1)>">',
    # CSS remote content and expressions.
    '<div style="background:url(http://evil.test/a.png)">x</div>',
    '<div style="background-image:url(&quot;http://evil.test/a.png&quot;)">x</div>',
    '<div style="width:expression(alert(1))">x</div>',
    '<div style="behavior:url(x.htc)">x</div>',
    '<div style="list-style-image:url(http://evil.test/a.png)">x</div>',
    '<img src="data:image/svg+xml;base64,PHN2ZyBvbmxvYWQ9YWxlcnQoMSk+">',
]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_payload_is_defused(payload: str) -> None:
    out = clean_html(payload).html.lower()
    for bad in (
        "<script", "onerror", "onload", "onbegin", "onmouseover", "javascript:", "vbscript:",
        "data:text", "<svg", "<iframe", "<object", "<embed", "<form", "<meta", "<base", "<link",
        "<style", "url(", "expression", "behavior", "evil.test", "image/svg",
    ):  # fmt: skip
        assert bad not in out, (payload, out)


def test_links_open_safely_and_styles_are_filtered() -> None:
    out = clean_html(
        '<a href="https://ok.test/?a=1&b=2">ok</a><p style="color:red;position:fixed">t</p>'
    ).html
    assert (
        '<a href="https://ok.test/?a=1&amp;b=2" target="_blank" rel="noopener noreferrer">' in out
    )
    assert '<p style="color:red">' in out
    assert 'href="mailto:a@b.test"' in clean_html('<a href="mailto:a@b.test">m</a>').html


def test_remote_images_blocked_until_allowed() -> None:
    html = '<img src="http://a.test/1.png"><img src="//b.test/2.png"><img src="https://c.test/3">'
    blocked = clean_html(html)
    assert blocked.blocked == 3 and "a.test" not in blocked.html
    allowed = clean_html(html, allow_remote=True)
    assert allowed.blocked == 0 and 'src="http://a.test/1.png"' in allowed.html


def test_inline_and_data_images() -> None:
    data = "data:image/png;base64,iVBORw0KGgo="
    assert f'src="{data}"' in clean_html(f'<img src="{data}">').html
    mapped = clean_html(
        '<img src="cid:logo@x">', cid_url=lambda cid: f"data:image/png;base64,{cid}"
    )
    assert 'src="data:image/png;base64,logo@x"' in mapped.html
    assert "src" not in clean_html('<img src="cid:gone">', cid_url=lambda cid: None).html
    assert "src" not in clean_html('<img src="cid:x">').html


def test_chinese_text_kept() -> None:
    assert clean_html("<p>你好，世界</p>").html == "<p>你好，世界</p>"


def test_linkify() -> None:
    assert linkify("a <b> & c") == "a &lt;b&gt; &amp; c"
    out = linkify('see http://x.test/a?b=1&c="2" and www.z.cn。 mailto:a@b.test.')
    assert '<a href="http://x.test/a?b=1&amp;c=" rel="noopener noreferrer" target="_blank">' in out
    assert (
        '<a href="http://www.z.cn" rel="noopener noreferrer" target="_blank">www.z.cn</a>。' in out
    )
    assert '<a href="mailto:a@b.test" rel="noopener noreferrer" target="_blank">' in out
    assert "<a" not in linkify("javascript:alert(1) data:text/html,x")
    assert linkify("(https://p.test/x)") == (
        '(<a href="https://p.test/x" rel="noopener noreferrer" target="_blank">https://p.test/x</a>)'
    )
