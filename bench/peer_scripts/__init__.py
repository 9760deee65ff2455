"""Small launchers for peers that have no command line of their own (run in the peer's venv)."""
