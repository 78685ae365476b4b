"""Mail content made safe to show: HTML mail through nh3 (tags, attributes, URL schemes and
CSS properties by allow list; remote images dropped until allowed), plain text escaped with
its web links made clickable."""

from __future__ import annotations

import copy
import html
import re
from collections.abc import Callable

import nh3

LINK_REL = "noopener noreferrer"

_TAGS = set(nh3.ALLOWED_TAGS) | {
    "font",
    "center",
    "span",
    "div",
    "u",
    "s",
    "strike",
    "big",
    "small",
}
_TAGS -= {"area", "map"}
_ATTRIBUTES = copy.deepcopy(nh3.ALLOWED_ATTRIBUTES)
for _tag in _TAGS:
    _ATTRIBUTES.setdefault(_tag, set()).update({"style", "align", "dir", "title"})
_ATTRIBUTES["font"] = {"color", "size", "face", "style"}
_ATTRIBUTES["img"] = {"src", "alt", "width", "height", "style", "title", "align"}
for _tag in ("table", "td", "th", "tr", "tbody", "thead", "tfoot"):
    _ATTRIBUTES.setdefault(_tag, set()).update(
        {
            "width",
            "height",
            "bgcolor",
            "border",
            "cellpadding",
            "cellspacing",
            "valign",
            "colspan",
            "rowspan",
        }
    )
_ATTRIBUTES["a"] = {"href", "title", "style", "name"}

STYLE_PROPERTIES = frozenset(
    {
        "color", "background-color", "font", "font-family", "font-size", "font-style",
        "font-weight", "text-align", "text-decoration", "text-indent", "text-transform",
        "line-height", "letter-spacing", "white-space", "vertical-align", "direction",
        "margin", "margin-top", "margin-right", "margin-bottom", "margin-left",
        "padding", "padding-top", "padding-right", "padding-bottom", "padding-left",
        "border", "border-top", "border-right", "border-bottom", "border-left",
        "border-color", "border-style", "border-width", "border-collapse", "border-spacing",
        "border-radius", "width", "height", "max-width", "min-width", "display", "float",
        "clear", "list-style-type",
    }
)  # fmt: skip
"""CSS properties kept in ``style``: none that can load a URL (background-image,
list-style-image, border-image, content, behavior...), none that position over the page."""

_SAFE_DATA_IMAGE = re.compile(r"^data:image/(png|gif|jpe?g|webp|bmp);base64,[a-z0-9+/=\s]*$", re.I)
_REMOTE = re.compile(r"^\s*(https?:)?//", re.I)
_LINK_SCHEMES = re.compile(r"^\s*(https?:|mailto:|#)", re.I)


_CSS_FUNCTION = re.compile(r"([a-z-]*)\s*\(", re.I)
_CSS_FUNCTIONS_OK = frozenset({"rgb", "rgba", "hsl", "hsla", "calc"})


def _safe_style(value: str) -> str | None:
    """A ``style`` value without the declarations that call anything but a colour or calc
    function (``expression()``, ``url()``, ``image-set()``...) or use CSS escapes (which can
    spell those); None when nothing is left."""
    kept = []
    for decl in value.split(";"):
        if "\\" in decl or "/*" in decl:
            continue
        if any(m.group(1).lower() not in _CSS_FUNCTIONS_OK for m in _CSS_FUNCTION.finditer(decl)):
            continue
        if decl.strip():
            kept.append(decl.strip())
    return ";".join(kept) or None


class CleanResult:
    """The sanitised HTML and how many remote images were blocked in it."""

    def __init__(self, html_text: str, blocked: int) -> None:
        self.html = html_text
        self.blocked = blocked


def clean_html(
    text: str, allow_remote: bool = False, cid_url: Callable[[str], str | None] | None = None
) -> CleanResult:
    """``text`` (an HTML mail body) with only safe markup left: no script, no style sheets,
    no forms, no event handlers, no ``javascript:``/``data:`` links, no CSS that loads
    anything; links get ``rel="noopener noreferrer" target="_blank"``. ``<img src>``: a
    ``cid:`` reference becomes ``cid_url(content_id)``, a remote URL is kept only when
    ``allow_remote`` (else dropped and counted), a ``data:`` image of a raster type is kept."""
    blocked = 0

    def keep(tag: str, attr: str, value: str) -> str | None:
        nonlocal blocked
        if attr == "src":
            if tag != "img":
                return None
            if value.lower().startswith("cid:"):
                return cid_url(value[4:].strip().strip("<>")) if cid_url is not None else None
            if _REMOTE.match(value):
                if allow_remote:
                    return value
                blocked += 1
                return None
            return value if _SAFE_DATA_IMAGE.match(value) else None
        if attr == "style":
            return _safe_style(value)
        if attr == "href":
            return value if _LINK_SCHEMES.match(value) else None
        return value

    cleaned = nh3.clean(
        text,
        tags=_TAGS,
        attributes=_ATTRIBUTES,
        attribute_filter=keep,
        url_schemes={"http", "https", "mailto", "data", "cid"},
        link_rel=LINK_REL,
        set_tag_attribute_values={"a": {"target": "_blank"}},
        filter_style_properties=set(STYLE_PROPERTIES),
        clean_content_tags={
            "script",
            "style",
            "title",
            "head",
            "svg",
            "math",
            "object",
            "template",
        },
        strip_comments=True,
    )
    return CleanResult(cleaned, blocked)


_URL = re.compile(r"""\b(?:https?://|www\.)[^\s<>"'\x00-\x1f\x7f]+|\bmailto:[^\s<>"'()]+""", re.I)
_TRAILING = ".,;:!?)]}>'\"。，；：！？）】》"


def linkify(text: str) -> str:
    """``text`` as HTML: escaped, with http(s), ``www.`` and ``mailto:`` links made into
    ``<a>`` elements that open in a new tab without an opener or referrer. Nothing else
    (``javascript:``, ``data:``) becomes a link."""
    out: list[str] = []
    pos = 0
    for m in _URL.finditer(text):
        url = m.group(0)
        stripped = url.rstrip(_TRAILING)
        end = m.start() + len(stripped)
        out.append(html.escape(text[pos : m.start()]))
        href = stripped if not stripped.lower().startswith("www.") else "http://" + stripped
        out.append(
            f'<a href="{html.escape(href, quote=True)}" rel="{LINK_REL}" target="_blank">'
            f"{html.escape(stripped)}</a>"
        )
        pos = end
    out.append(html.escape(text[pos:]))
    return "".join(out)
