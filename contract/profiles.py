"""Tracking profiles: where every job records, and the one command that starts a lab server.

A profile is `mlruns_config/profiles/<name>.yaml`, or any path to a .yaml file:

    tracking_uri: the store jobs use (sqlite:///mlflow.db, http://host:5000, ...)
    storage:      optional; the database that workers of a beam search or an Optuna study share,
                  used by `storage=<profile>` (PostgreSQL reads its password from PGPASSWORD or
                  ~/.pgpass; a URL with a password may come from ${VAR}, never from -P)
    server:       optional; how `python -m contract.profiles serve <profile>` starts that server:
                  backend_store_uri, artifacts_destination, s3_endpoint_url, host, port, workers,
                  allowed_hosts, auth (false, or database_uri / admin_username / default_permission)

String values may use ${VAR} or ${VAR:-default}, so credentials stay in the environment.

The store a job uses, first found wins: an explicit setting (`--tracking_uri`, a URI or a
profile), $PRUNETRACK_PROFILE (a profile), $MLFLOW_TRACKING_URI, MLflow's default
(sqlite:///mlflow.db in the working folder).

    python -m contract.profiles uri lab      print the profile's tracking URI
    python -m contract.profiles serve lab    create the schema once, then run the server
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import yaml
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from contract.schema import creation_lock

logger = logging.getLogger(__spec__.name)  # also under `python -m contract.profiles`

PROFILES_DIR = Path(__file__).resolve().parents[1] / "mlruns_config" / "profiles"
ENV_VAR = "PRUNETRACK_PROFILE"
PERMISSIONS = ("READ", "EDIT", "MANAGE", "NO_PERMISSIONS")
_NAME = re.compile(r"[A-Za-z0-9_-]+")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ProfileError(ValueError):
    """A profile that cannot be found, read or used."""


def available() -> list[str]:
    """Names of the profiles in mlruns_config/profiles."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def is_profile(value: str) -> bool:
    """A profile name (letters, digits, - and _) or a .yaml path, rather than a tracking URI."""
    return bool(_NAME.fullmatch(value)) or value.endswith((".yaml", ".yml"))


@dataclass
class Profile:
    """A loaded profile; `get` expands ${VAR} references of the value it returns."""

    name: str
    data: dict

    def get(self, key: str, default=None, section: str = ""):
        """Value of `key` in `section` (dotted path, e.g. "server.auth"), ${VAR}s expanded."""
        where = self.data
        for part in filter(None, section.split(".")):
            where = where.get(part) or {}
        value = where.get(key, default)
        return self._expand(value, f"{section}.{key}".lstrip(".")) if isinstance(value, str) else value

    def _expand(self, value: str, label: str) -> str:
        def one(match: re.Match) -> str:
            name, default = match.groups()
            if name in os.environ:
                return os.environ[name]
            if default is None:
                raise ProfileError(f"profile {self.name!r}: environment variable {name} is not set (used in {label})")
            return default

        return _VAR.sub(one, value)

    @property
    def tracking_uri(self) -> str:
        uri = self.get("tracking_uri")
        if not uri:
            raise ProfileError(f"profile {self.name!r} has no tracking_uri")
        return uri


def load(ref: str) -> Profile:
    """The profile named `ref` (in mlruns_config/profiles) or at path `ref`."""
    path = Path(ref) if ref.endswith((".yaml", ".yml")) else PROFILES_DIR / f"{ref}.yaml"
    if not path.is_file():
        raise ProfileError(f"unknown profile {ref!r}; available: {', '.join(available())}, or a path to a .yaml file")
    return Profile(ref, read_mapping(path, f"profile {ref!r} ({path})", ProfileError))


def read_mapping(path: Path, where: str, error: type[Exception]) -> dict:
    """The mapping of keys to values in YAML file `path`; else `error` saying what is wrong with `where`."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise error(f"{where} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise error(f"{where} must be a mapping of keys to values")
    return data


def resolve(setting: str | None = None) -> tuple[str, str]:
    """(tracking URI, where it came from) by the precedence above."""
    if setting:
        return (load(setting).tracking_uri, f"profile {setting!r}") if is_profile(setting) else (setting, "--tracking_uri")
    if os.environ.get(ENV_VAR):
        return load(os.environ[ENV_VAR]).tracking_uri, f"{ENV_VAR}={os.environ[ENV_VAR]}"
    import mlflow

    return mlflow.get_tracking_uri(), "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "the default"


def storage(value: str) -> str:
    """The database that a `storage` setting names: a URL or file path as given, or the `storage` of a
    profile (a name in mlruns_config/profiles or a .yaml path), whose URL may take its password from the
    environment. A URL that holds a password is refused: `mlflow run` records -P values as params and
    prints them."""
    if not value:
        return value
    if "://" in value:
        try:
            url = make_url(value)
        except ArgumentError:
            return value  # the storage's user reports a malformed URL
        if url.password:
            raise ProfileError(
                f"storage {url.render_as_string(hide_password=True)!r} holds a password, which mlflow run records in "
                "the run's params and prints; remove it and give the password through a profile (storage=<profile>, "
                "mlruns_config/profiles, its URL read from the environment), PGPASSWORD or ~/.pgpass"
            )
        return value
    if value.endswith((".yaml", ".yml")) or (_NAME.fullmatch(value) and (PROFILES_DIR / f"{value}.yaml").is_file()):
        url = load(value).get("storage")
        if not url:
            raise ProfileError(
                f"profile {value!r} has no storage; allowed: a profile with a storage URL "
                f"({', '.join(p for p in available() if load(p).data.get('storage'))}), a database "
                "URL without password, or a file path"
            )
        return url
    return value  # a file path: an SQLite database


def server_command(profile: Profile) -> tuple[list[str], list[str], dict]:
    """(schema command, server command, server environment) for the profile's `server` section."""
    if not isinstance(profile.data.get("server"), dict):
        raise ProfileError(f"profile {profile.name!r} has no server section: it names a store, it starts none")
    get = functools.partial(profile.get, section="server")
    backend = get("backend_store_uri")
    destination = get("artifacts_destination")
    if not backend or not destination:
        raise ProfileError(f"profile {profile.name!r}: server needs backend_store_uri and artifacts_destination")
    try:
        make_url(backend)
    except ArgumentError:
        raise ProfileError(
            f"profile {profile.name!r}: server.backend_store_uri {backend!r} is not a database URI; "
            "allowed: postgresql+psycopg2://..., mysql+pymysql://..., sqlite:///..."
        ) from None
    mlflow = [sys.executable, "-m", "mlflow"]
    cmd = mlflow + [
        "server",
        "--backend-store-uri",
        backend,
        "--artifacts-destination",
        destination,
        "--serve-artifacts",
        "--host",
        str(get("host", "127.0.0.1")),
        "--port",
        str(get("port", 5000)),
        "--workers",
        str(get("workers", 4)),
    ]
    # mlflow answers only Host headers it allows: by default the host jobs use, and this machine
    host = urlparse(profile.tracking_uri).hostname
    cmd += ["--allowed-hosts", get("allowed_hosts") or f"{host},{host}:*,localhost:*,127.0.0.1:*"]
    env = dict(os.environ)
    if get("s3_endpoint_url"):
        env["MLFLOW_S3_ENDPOINT_URL"] = get("s3_endpoint_url")
    if profile.data["server"].get("auth"):
        env["MLFLOW_AUTH_CONFIG_PATH"] = _auth_config(profile)
        cmd += ["--app-name", "basic-auth"]
    return mlflow + ["db", "upgrade", backend], cmd, env


def _auth_config(profile: Profile) -> str:
    """Write the basic-auth app's ini for the profile's `server.auth` mapping; its path."""
    get = functools.partial(profile.get, section="server.auth")
    if not isinstance(profile.data["server"]["auth"], dict) or not get("database_uri"):
        raise ProfileError(f"profile {profile.name!r}: server.auth must be false or a mapping with database_uri")
    permission = get("default_permission", "READ")
    if permission not in PERMISSIONS:
        raise ProfileError(
            f"profile {profile.name!r}: server.auth.default_permission {permission!r}; allowed: {', '.join(PERMISSIONS)}"
        )
    cache = str(get("cache_seconds", 60))
    if not cache.isdigit():
        raise ProfileError(f"profile {profile.name!r}: server.auth.cache_seconds {cache!r}; allowed: a whole number of seconds")
    if not os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):
        raise ProfileError("basic auth needs MLFLOW_FLASK_SERVER_SECRET_KEY set for the server (the same on every server)")
    try:
        import flask_wtf  # noqa: F401
    except ImportError:
        raise ProfileError("basic auth needs Flask-WTF: pip install 'mlflow[auth]'") from None
    fd, path = tempfile.mkstemp(prefix=f"prunetrack-auth-{Path(profile.name).stem}-", suffix=".ini")
    with os.fdopen(fd, "w") as ini:  # mode 0600; the admin password stays in MLFLOW_AUTH_ADMIN_PASSWORD
        ini.write(
            f"[mlflow]\ndefault_permission = {permission}\ndatabase_uri = {get('database_uri')}\n"
            f"admin_username = {get('admin_username', 'admin')}\n"
            f"auth_cache_ttl_seconds = {cache}\n"
        )
    return path


def serve(ref: str) -> None:
    """Check the database answers, create or upgrade its schema once (before any server worker
    exists, and under the schema-creation lock: concurrent first use of an empty store races), then
    become `mlflow server`."""
    schema, cmd, env = server_command(load(ref))
    backend = schema[-1]
    shown = make_url(backend).render_as_string(hide_password=True)
    try:
        engine = create_engine(backend)
        engine.connect().close()
        engine.dispose()
    except ImportError as err:
        raise ProfileError(
            f"profile {ref!r}: no database driver for {shown} ({err}); name an installed one, e.g. postgresql+psycopg2://"
        ) from None
    except Exception as err:  # wrong host, database missing, refused password
        first = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
        raise ProfileError(f"profile {ref!r}: cannot connect to the backend store {shown}: {first}") from None
    with creation_lock(backend):  # profiles served together: one creates the schema, the others find it made
        done = subprocess.run(schema, env=env, capture_output=True, text=True)
    if done.returncode:
        lines = done.stderr.strip().splitlines() or ["no output"]
        reason = next((line for line in reversed(lines) if "Error" in line), lines[-1])
        raise ProfileError(f"profile {ref!r}: cannot create the schema in {shown}: {reason}")
    logger.info(f"schema ready in {shown}; starting the server")
    os.execve(cmd[0], cmd, env)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m contract.profiles", description="Tracking profiles")
    parser.add_argument("action", choices=("uri", "serve"), help="uri: print the tracking URI; serve: start the server")
    parser.add_argument("profile", help=f"profile name ({', '.join(available())}) or path to a .yaml file")
    args = parser.parse_args(argv)
    try:
        if args.action == "uri":
            print(load(args.profile).tracking_uri)
        else:
            serve(args.profile)
    except ProfileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
