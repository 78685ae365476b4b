"""Delivery of spooled messages: local mailboxes now, the relay's channels later."""

from mailgw.delivery.local import LocalDelivery, delivery_prefix

__all__ = ["LocalDelivery", "delivery_prefix"]
