"""HTTP transports: the downstream endpoints clients connect to."""
