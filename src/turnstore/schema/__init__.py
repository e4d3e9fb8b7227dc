"""Schema management: Alembic migrations run from Python, and adoption of SDK-written files."""
