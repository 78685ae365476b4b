"""Message tracking: every step of every message as a timed event, in an embedded SQLite store.

``Tracker.record`` (``tracker.py``) is the one call the SMTP roles, local delivery, the relay
and the ``mailgw`` command make; it counts the event in the Prometheus message-flow counters
(``metrics.py``) and queues it for a writer thread, which writes the queue in batches into
``data_dir/tracking.sqlite`` (``store.py``). ``timeline.py`` reads it back as per-message
timelines (``mailgw track``, and the admin API's ``GET /api/v1/tracking``:
``mailgw.http.api.tracking``).
"""

from mailgw.tracking.events import Kind
from mailgw.tracking.tracker import NO_TRACKING, Tracker, tracker_from_config

__all__ = ["NO_TRACKING", "Kind", "Tracker", "tracker_from_config"]
