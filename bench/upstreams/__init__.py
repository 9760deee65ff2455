"""Echo upstreams used by the benchmark (SDK-based and raw)."""
