"""Alembic migrations of the auth store, applied by ``Store.open`` (``alembic upgrade head``).

A new revision: ``alembic -c /dev/null -x url=sqlite:///scratch.db revision -m "what"`` run with
``script_location`` pointing here (see ``env.py``), then write its ``upgrade``/``downgrade`` by hand:
migrations never import the runtime table definitions, so old revisions stay as they were.
"""
