"""The ``mailgw`` admin command: directory management, store maintenance, dev certificates."""
