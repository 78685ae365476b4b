"""The outbound relay: MX lookup, SMTP client, channels, retry schedule and bounces (DSN)."""
