"""Mount the webmail on the ``http`` role (``[webmail] enabled = yes``): the node's store,
shared auth guard, submitter and directory put together."""

from __future__ import annotations

import os
import socket
from typing import Any

from mailgw.webmail.imapreader import IMAPReader
from mailgw.webmail.reader import IMailReader, StoreReader
from mailgw.webmail.settings import UserSettings
from mailgw.webmail.web import WebmailResource


def build_webmail(node: Any) -> WebmailResource:
    """The webmail resource of ``node``: reads through the node's own store (or over IMAP
    with ``[webmail] reader = imap``), sends through
    ``node.submitter`` (None when the submission role is off: sending then answers 503),
    logs in through ``node.auth`` (the penalty every protocol shares). A spam/ham reporter
    the node offers as ``node.spam_reporter`` becomes the report hook."""
    config = node.config
    wm = config.webmail
    reader: IMailReader
    if wm.reader == "imap":
        reader = IMAPReader(wm.imap_host, wm.imap_port, wm.imap_tls, node.run_io)
    else:
        reader = StoreReader(node.store)
    resource = WebmailResource(
        reader,
        node.auth,
        node.submitter,
        node.directory,
        UserSettings(os.path.join(config.server.data_dir, "webmail")),
        node.reactor,
        config.server.hostname or socket.getfqdn(),
        wm.session_timeout,
        wm.max_upload_size,
        wm.page_size,
    )
    reporter = getattr(node, "spam_reporter", None)
    if reporter is not None:
        resource.report_spam = reporter
    return resource


def mount_webmail(node: Any, root: Any) -> WebmailResource:
    """Build the webmail and mount it at ``/`` of ``root`` (public: it has its own login)."""
    resource = build_webmail(node)
    root.mount("/", resource, guarded=False)
    return resource
