"""The tunnel (issue 5): an outbound-only connector and the gateway as its relay.

``protocol`` is the sans-IO frame codec and multiplexer, ``link`` drives it over a WebSocket,
``relay`` is the gateway's end (``/connect``, dynamic servers, ``TunnelTransport``) and
``connector`` the private end (``mcp-bastion connect``). See docs/internals/tunnel.md.
"""
