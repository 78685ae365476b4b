"""Cluster mode: which backend node holds each mailbox (``nodemap``), and moving a mailbox
between nodes (``move``)."""
