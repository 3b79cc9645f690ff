"""Alembic migrations of the flywheel schema (``flywheel db upgrade``)."""
