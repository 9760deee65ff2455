"""Benchmark harness for mcp-bastion (issue 3)."""
