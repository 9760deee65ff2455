"""Upstream channels: how the gateway reaches MCP servers (stdio, Streamable HTTP, SSE)."""
