"""Build the channel a server's configuration calls for."""

from __future__ import annotations

from ..config import ServerConfig, resolve_mapping
from .base import Channel, Era, Sink
from .http import SseChannel, StreamableHttpChannel
from .stdio import StdioChannel


def make_channel(config: ServerConfig, era: Era, sink: Sink) -> Channel:
    """A new, unstarted channel; secret references are resolved here, at the last moment."""
    if config.transport == "stdio":
        assert config.command is not None
        return StdioChannel(
            config.name,
            era,
            sink,
            config.command,
            list(config.args),
            resolve_mapping(config.env),
            config.cwd,
            handshake_timeout=config.timeout,
        )
    if config.transport == "tunnel":  # a server behind a connector: a message pipe over its link
        from ..tunnel.pipe import TunnelChannel
        from ..tunnel.relay import REGISTRY

        return TunnelChannel(config.name, era, sink, REGISTRY, config.timeout)
    assert config.url is not None
    headers = resolve_mapping(config.headers)
    if config.transport == "sse":
        return SseChannel(config.name, sink, config.url, headers, config.timeout)
    return StreamableHttpChannel(config.name, era, sink, config.url, headers, config.timeout)
