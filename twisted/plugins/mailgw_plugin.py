"""twistd plugin entry: `twistd mailgw` builds the mailgw service from mailgw.tap."""

from twisted.application.service import ServiceMaker

mailgw = ServiceMaker(
    "mailgw",
    "mailgw.tap",
    "Enterprise mail system: MX, submission, POP3, IMAP, webmail, relay",
    "mailgw",
)
