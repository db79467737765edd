"""Creating a database's schema once when many processes start together.

Workers started at the same moment on a fresh store would each create and migrate MLflow's (or
Optuna's, or the claims table's) schema, and break it (a half-run migration leaves tables such as
`_alembic_tmp_latest_metrics` behind). `creation_lock` makes them take turns: a file lock beside an
SQLite file, an advisory lock in PostgreSQL (`pg_advisory_lock`), a named lock in MySQL
(`GET_LOCK`); the first creates the schema, the others find it made. `repair_hint` says how to fix a
store that is broken all the same.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import sqlalchemy as sa

LOCK_KEY = 5_627_101  # the advisory lock's number: the same in every prunetrack process
LOCK_TIMEOUT_S = 600  # a schema creation (MLflow's ~50 migrations) takes seconds, not minutes


def engine_url(url: str | sa.URL) -> sa.URL:
    """`url` with the PostgreSQL driver named: SQLAlchemy 2.1 maps postgresql:// to psycopg 3, the project
    installs psycopg2 (psycopg 3 is used where it is installed)."""
    import importlib.util

    url = sa.make_url(url)
    if url.drivername == "postgresql" and importlib.util.find_spec("psycopg") is None:
        url = url.set(drivername="postgresql+psycopg2")
    return url


@contextlib.contextmanager
def creation_lock(url: str | sa.URL):
    """Hold the schema-creation lock of database `url` inside the block (none for other databases).
    Raises what connecting raises when a server database cannot be reached."""
    url = engine_url(url)
    backend = url.get_backend_name()
    if backend == "sqlite":
        if not url.database or url.database == ":memory:":
            yield
            return
        from filelock import FileLock

        path = Path(url.database).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{path}.lock", timeout=LOCK_TIMEOUT_S):
            yield
        return
    take, release = {
        "postgresql": (f"SELECT pg_advisory_lock({LOCK_KEY})", f"SELECT pg_advisory_unlock({LOCK_KEY})"),
        "mysql": (f"SELECT GET_LOCK('prunetrack_schema', {LOCK_TIMEOUT_S})", "SELECT RELEASE_LOCK('prunetrack_schema')"),
    }.get(backend, (None, None))
    if take is None:
        yield
        return
    args = {"connect_timeout": 10} if backend in ("postgresql", "mysql") else {}
    engine = sa.create_engine(url, connect_args=args, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(take))
            try:
                yield
            finally:
                conn.execute(sa.text(release))
    finally:
        engine.dispose()


def repair_hint(url: str | sa.URL, shown: str) -> str:
    """How to repair the broken store at `url` (`shown`: its URL with the password hidden): drop the
    tables a migration cut short left behind, then let MLflow finish the migration."""
    try:
        engine = sa.create_engine(engine_url(url), poolclass=sa.pool.NullPool)
        try:
            leftovers = sorted(t for t in sa.inspect(engine).get_table_names() if t.startswith("_alembic_tmp_"))
        finally:
            engine.dispose()
    except Exception:
        leftovers = []
    drop = f"drop the table(s) {', '.join(leftovers)} a migration cut short left behind, then " if leftovers else ""
    return f"to repair it, back it up, {drop}run `mlflow db upgrade {shown}`"
