"""Alembic migrations of the broker database, run programmatically by ``kbs.store.migrate`` at
open.

``env.py`` takes the open connection from ``config.attributes["connection"]`` (the caller holds
the transaction and the migration lock); ``versions/`` holds the revisions, oldest first:
``0001`` creates the schema or adopts a database written before Alembic (``schema_version``);
``0002`` adds the ``expires_at`` indexes the periodic purge uses where they are missing.
"""

__all__: list[str] = []
