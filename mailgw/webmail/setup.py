"""Mount the webmail on the ``http`` role (``[webmail] enabled = yes``): the node's store,
shared auth guard, submitter and directory put together."""

from __future__ import annotations

import os
import socket
import ssl
from typing import Any

from mailgw.webmail.imapreader import IMAPReader
from mailgw.webmail.reader import IMailReader, StoreReader
from mailgw.webmail.report import reputation_hook
from mailgw.webmail.settings import UserSettings
from mailgw.webmail.web import WebmailResource


def build_webmail(node: Any) -> WebmailResource:
    """The webmail resource of ``node``: reads through the node's own store (or over IMAP
    with ``[webmail] reader = imap``), sends through
    ``node.submitter`` (None when the submission role is off: sending then answers 503),
    logs in through ``node.auth`` (the penalty every protocol shares). The "Spam" / "Not
    spam" hook: ``node.spam_reporter`` when the node offers one, else the reputation
    service's ``report`` (``node.policy.reputation``) when it runs, else none (the message
    is only moved)."""
    config = node.config
    wm = config.webmail
    reader: IMailReader
    if wm.reader == "imap":
        context = ssl.create_default_context(cafile=wm.imap_ca_file or None)
        reader = IMAPReader(wm.imap_host, wm.imap_port, wm.imap_tls, node.run_io, context)
    else:
        reader = StoreReader(node.store, node.run_io)
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
    reputation = getattr(getattr(node, "policy", None), "reputation", None)
    if reporter is not None:
        resource.report_spam = reporter
    elif reputation is not None and hasattr(reputation, "report"):
        resource.report_spam = reputation_hook(reputation)
    return resource


def mount_webmail(node: Any, root: Any) -> WebmailResource:
    """Build the webmail and mount it at ``/`` of ``root`` (public: it has its own login)."""
    resource = build_webmail(node)
    root.mount("/", resource, guarded=False)
    return resource
