"""Plain values shared by every layer: addresses, envelopes, replies."""

from mailgw.model.address import Address, AddressError, parse_path
from mailgw.model.envelope import Envelope
from mailgw.model.reply import Reply

__all__ = ["Address", "AddressError", "Envelope", "Reply", "parse_path"]
