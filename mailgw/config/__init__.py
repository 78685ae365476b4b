"""etc/mailgw.ini -> frozen, validated Config; errors say ``file:section:key: what is wrong``."""

from mailgw.config.schema import (
    ChannelConfig,
    Config,
    ConfigError,
    DeliveryConfig,
    DirectoryConfig,
    IMAPConfig,
    MXConfig,
    POP3Config,
    RelayConfig,
    RouteConfig,
    ServerConfig,
    StoreConfig,
    SubmissionConfig,
    TLSConfig,
    load,
    schema,
)

__all__ = [
    "ChannelConfig",
    "Config",
    "ConfigError",
    "DeliveryConfig",
    "DirectoryConfig",
    "IMAPConfig",
    "MXConfig",
    "POP3Config",
    "RelayConfig",
    "RouteConfig",
    "ServerConfig",
    "StoreConfig",
    "SubmissionConfig",
    "TLSConfig",
    "load",
    "schema",
]
