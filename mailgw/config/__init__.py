"""etc/mailgw.ini -> frozen, validated Config; errors say ``file:section:key: what is wrong``."""

from mailgw.config.schema import (
    Config,
    ConfigError,
    DeliveryConfig,
    DirectoryConfig,
    MXConfig,
    POP3Config,
    ServerConfig,
    StoreConfig,
    TLSConfig,
    load,
    schema,
)

__all__ = [
    "Config",
    "ConfigError",
    "DeliveryConfig",
    "DirectoryConfig",
    "MXConfig",
    "POP3Config",
    "ServerConfig",
    "StoreConfig",
    "TLSConfig",
    "load",
    "schema",
]
