"""Alembic revisions of the broker database (see ``kbs.migrations``)."""

__all__: list[str] = []
