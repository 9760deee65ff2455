"""Revisions of the auth store schema, oldest first by ``down_revision``."""
