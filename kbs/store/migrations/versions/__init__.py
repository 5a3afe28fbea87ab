"""Alembic revisions of the broker database (see ``kbs.store.migrations``)."""

__all__: list[str] = []
