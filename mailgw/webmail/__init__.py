"""The webmail: a person's mail in the browser, served by the ``http`` role at ``/``.

A proxy onto the mail system, not a second store: it reads through an ``IMailReader``
(``reader.StoreReader`` over the node's own store; ``reader.IMAPReader`` for a gateway in
front of remote backends) and sends through the submission path (``node.submitter``).

- ``message``: a stored message as the pages show it (headers, text, HTML, attachments),
  read with ``mailgw.mime``; ``threads``: conversations; ``sanitize``: nh3 for HTML mail,
  safe links in plain text; ``compose``: new mail, replies, forwards and drafts as bytes;
- ``sessions``: login sessions and CSRF tokens; ``settings``: per-user signature;
- ``pages``: the server-rendered HTML; ``web``: the twisted.web resource (routing, login
  under the node's shared auth penalty, every POST checked for its CSRF token);
- ``setup.mount_webmail(node, root)``: what the ``http`` role calls when ``[webmail]
  enabled = yes``.
"""
