"""mcp-bastion: one gateway in front of any MCP server, in every protocol era."""

__version__ = "0.1.0"
