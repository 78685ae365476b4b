"""The one parser of message structure, shared by IMAP, webmail and policy checks.

Pure functions over ``bytes``: :func:`parse` gives a tree of parts with byte offsets into
the stored message, so every IMAP section is an exact slice of the stored bytes.
"""

from mailgw.mime.addresses import AddressItem, parse_address_list
from mailgw.mime.cache import StructureCache
from mailgw.mime.headers import HeaderField, decode_bytes, decode_header_value
from mailgw.mime.structure import DEFAULT_LIMITS, Limits, MessageStructure, Part, find_part, parse
from mailgw.mime.text import (
    addresses,
    date,
    decode_quoted_printable,
    decode_transfer,
    header_values,
    parse_date,
    text_parts,
)

__all__ = [
    "AddressItem",
    "DEFAULT_LIMITS",
    "HeaderField",
    "Limits",
    "MessageStructure",
    "Part",
    "StructureCache",
    "addresses",
    "date",
    "decode_bytes",
    "decode_header_value",
    "decode_quoted_printable",
    "decode_transfer",
    "find_part",
    "header_values",
    "parse",
    "parse_address_list",
    "parse_date",
    "text_parts",
]
