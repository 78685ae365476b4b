"""The node's durable change journal (``mailgw.interfaces.IChangeLog``).

Every store and directory mutation records ``mailgw.model.change.ChangeEntry`` rows in a
``journal`` table of the database it changes, in the same SQLite transaction, numbered by the
node-wide ``Sequencer`` (``data_dir/journal/``) in commit order. ``ChangeLog`` reads them back
(any process) and tells subscribers; ``StoreJournal`` is the store's recorder.

Imports: ``mailgw.model``, ``mailgw.interfaces`` and the standard library (Twisted only for
the tail's timer); the store and the directory import this package, never the reverse.
"""

from mailgw.journal.changelog import ChangeLog
from mailgw.journal.sequencer import DEFAULT_RETENTION, Sequencer
from mailgw.journal.writer import DBJournal

__all__ = ["DEFAULT_RETENTION", "ChangeLog", "DBJournal", "Sequencer"]
