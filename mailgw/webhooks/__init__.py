"""Webhooks: HMAC-signed POSTs on message events (delivered, failed, quarantined), sent from a
durable outbox (``outbox``) by ``sender.WebhookService``, fed by a listener on the node's
``Tracker`` (``events``)."""
