"""Alembic revisions of ``engine.db`` (a package so that regular installs ship them)."""
