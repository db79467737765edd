"""Where a tracking store is and whether it can be used: its kind from the URI, its URI with the
password hidden, the checks of a local SQLite path, fast-failing HTTP requests for the start-up
check, and one-line reasons for errors. contract.tracking.connect uses them."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


class TrackingError(RuntimeError):
    """The tracking store cannot be reached or used."""


# How the start-up check talks to a server: one retry, 10 s per request, so that an unreachable or
# refusing store is reported within 30 s (MLflow's defaults retry for minutes).
FAST_REQUESTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


@contextlib.contextmanager
def fast_requests():
    """MLflow HTTP requests made inside fail fast (see FAST_REQUESTS); the environment is restored after."""
    saved = {k: os.environ.get(k) for k in FAST_REQUESTS}
    os.environ.update(FAST_REQUESTS)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def database_url(uri: str) -> str | None:
    """The SQLAlchemy URL of a database tracking store (sqlite:, postgresql:, mysql:, ...); None for a
    server or a folder."""
    if "://" not in uri or uri.startswith(("http://", "https://", "file:", "databricks")):
        return None
    try:
        from sqlalchemy.engine import make_url

        make_url(uri)
    except Exception:
        return None
    return uri


def shown(uri: str) -> str:
    """A store's URI with its password hidden."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(uri).render_as_string(hide_password=True) if database_url(uri) else uri
    except Exception:
        return uri


def check_local_store(uri: str) -> None:
    """A `sqlite:///path` store must name a file in a folder (MLflow creates missing folders)."""
    if not uri.startswith("sqlite:"):
        return
    from sqlalchemy.engine import make_url

    try:
        database = make_url(uri).database
    except Exception:
        raise TrackingError(
            f"tracking URI {uri!r} is not a database URI; allowed: sqlite:///<path to a .db file>, "
            "http(s)://host:port, or a profile"
        ) from None
    if not database or database == ":memory:":
        return
    path = Path(database).expanduser()
    if path.is_dir():
        raise TrackingError(f"tracking URI {uri!r} names the folder {str(path)!r}; allowed: sqlite:///<path to a .db file>")
    for folder in path.parents:
        if folder.exists():
            if not folder.is_dir():
                raise TrackingError(
                    f"tracking URI {uri!r}: {str(folder)!r} is a file, not a folder; allowed: "
                    "sqlite:///<path to a .db file in a folder>"
                )
            return


def http_status(err: Exception) -> int | None:
    """The HTTP status of a failed request: requests' errors carry the response, MLflow's the code."""
    response = getattr(err, "response", None)
    if response is not None:
        return response.status_code
    return err.get_http_status_code() if hasattr(err, "get_http_status_code") else None


def first_line(err: BaseException) -> str:
    """One line saying why `err` happened: the server's own message where it sent one (an HTTP
    error's `message`, the database driver's under a SQLAlchemy error), else the error's first line."""
    try:
        text = err.response.json()["message"]
    except Exception:
        text = str(getattr(err, "orig", None) or err)
    return (text.strip().splitlines()[0] if text.strip() else type(err).__name__)[:300]
