"""mailgw: an enterprise mail system on Twisted."""

__version__ = "0.1.0"
