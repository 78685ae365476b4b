"""Network plumbing shared by every role: listeners, PROXY protocol, TLS contexts."""
