"""Upload the reports and figures of chosen runs to S3 with a manifest; a rerun uploads nothing new.

    python -m analysis.export --dest s3://bucket/prefix [--run_ids A,B | --experiment E] [--kinds ...]
                              [--endpoint_url URL]

Every artifact of each chosen run goes to dest/<run_id>/<path> through boto3's managed transfer
(large files in parts); an object already there with the same size and content (its ETag: the MD5,
or for a file sent in parts the MD5 of the parts' MD5s) is skipped. dest/manifest.json lists every exported run (id, kind, params,
the commit it ran from, its objects), the exporter's code version and the time; it is rewritten
only when the runs it lists change. The endpoint is --endpoint_url, else $AWS_ENDPOINT_URL, else
$MLFLOW_S3_ENDPOINT_URL, else AWS. Credentials come from boto3's own chain (environment, profile)
and are never logged; passwords in URLs are masked in params and the manifest.
"""

from __future__ import annotations

from analysis.settings import ExportSettings
from analysis.settings import export_parser as parser
from contract import cli

if __name__ == "__main__":  # `--help` and a bad argument are answered before the imports below load MLflow
    cli.check_args(parser)

import hashlib
import json
import mimetypes
import os
import re
import tempfile
import time
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError
from s3transfer.utils import ChunksizeAdjuster

from analysis import job, store
from analysis.store import AnalysisError
from contract import names, tracking

ROOT = Path(__file__).resolve().parents[1]
_PASSWORD = re.compile(r"(://[^/:@\s]*):[^/@\s]*@")


def public(text: str) -> str:
    """`text` with the password of any URL in it masked."""
    return _PASSWORD.sub(r"\1:***@", str(text))


def parse_dest(dest: str) -> tuple[str, str]:
    """(bucket, prefix) of s3://bucket/prefix."""
    match = re.fullmatch(r"s3://([^/]+)/?(.*)", dest.strip())
    if not match:
        raise AnalysisError(f"dest {dest!r} is not an S3 location; allowed: s3://bucket/prefix")
    return match.group(1), match.group(2).strip("/")


def endpoint(explicit: str = "") -> str | None:
    """The S3 endpoint URL: explicit, else $AWS_ENDPOINT_URL, else $MLFLOW_S3_ENDPOINT_URL, else None (AWS)."""
    return explicit or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None


def s3_error(err: Exception, bucket: str, url: str | None) -> AnalysisError:
    """One line saying why S3 refused (never the credentials themselves)."""
    where = f"at {public(url)}" if url else "on AWS"
    if isinstance(err, NoCredentialsError):
        return AnalysisError("no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
    if isinstance(err, EndpointConnectionError):
        return AnalysisError(f"cannot reach the S3 endpoint {public(url or 'of AWS')}")
    if isinstance(err, ClientError):
        code = err.response.get("Error", {}).get("Code", "")
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status == 404 or code in ("404", "NoSuchBucket"):
            return AnalysisError(f"bucket {bucket!r} does not exist {where}")
        if status == 403 or code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
            return AnalysisError(
                f"S3 {where} refused the credentials for bucket {bucket!r} ({code or status}); "
                "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
            )
        return AnalysisError(f"S3 {where} failed on bucket {bucket!r}: {code or status}")
    return AnalysisError(f"S3 {where} failed on bucket {bucket!r}: {type(err).__name__}")


def chosen_runs(client, run_ids: list[str], experiment: str, kinds: list[str]) -> list:
    """The runs named, else every FINISHED run of `kinds` (in `experiment`), oldest first."""
    if run_ids:
        return [store.get_run(client, r) for r in run_ids]
    found = [run for kind in kinds for run in store.runs(client, kind, experiment)]
    if not found:
        raise AnalysisError(
            f"no FINISHED run of kind {', '.join(kinds)} in {public(client.tracking_uri)}"
            + (f", experiment {experiment!r}" if experiment else "")
        )
    return sorted(found, key=lambda r: (r.info.start_time, r.info.run_id))


def _git_commit(root: Path) -> str | None:
    """The commit checked out in `root`'s git folder, read from its files (no git process)."""
    git = root / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head.removeprefix("ref: ")
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        packed = (git / "packed-refs").read_text().splitlines()
        return next((line.split()[0] for line in packed if line.endswith(" " + ref)), None)
    except OSError:
        return None


def code_version() -> dict:
    """The exporter's git commit (when run from a checkout) and prunetrack's package version."""
    try:
        package = version("prunetrack")
    except PackageNotFoundError:
        package = None
    return {"git_commit": _git_commit(ROOT), "prunetrack": package}


def _existing(s3, bucket: str, prefix: str) -> dict[str, tuple[int, str]]:
    """{key: (size, etag)} of the objects under `prefix`."""
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else "")
    return {o["Key"]: (o["Size"], o["ETag"].strip('"')) for page in pages for o in page.get("Contents", [])}


def _key(prefix: str, *parts: str) -> str:
    return "/".join(p for p in (prefix, *parts) if p)


# Uploads go through boto3's managed transfer: files at or above the threshold are sent in parts, in
# parallel. The classic transfer manager (never the CRT one) so that the part size, and thereby the
# ETag S3 gives the object, is known here.
TRANSFER = TransferConfig(multipart_threshold=64 * 2**20, multipart_chunksize=64 * 2**20, preferred_transfer_client="classic")


def digests(path: Path, config: TransferConfig | None = None) -> tuple[str, str]:
    """(MD5 of the file, the ETag S3 gives it when uploaded with `config`), reading the file once in
    parts. Below the multipart threshold the ETag is the MD5; above, it is the MD5 of the parts' MD5s
    followed by "-<number of parts>", with the part size the transfer manager picks for this size."""
    config = config or TRANSFER
    size = path.stat().st_size
    part_size = ChunksizeAdjuster().adjust_chunksize(config.multipart_chunksize, size)
    whole, parts = hashlib.md5(usedforsecurity=False), []
    with path.open("rb") as f:
        while chunk := f.read(part_size):
            whole.update(chunk)
            parts.append(hashlib.md5(chunk, usedforsecurity=False).digest())
    if size < config.multipart_threshold:
        return whole.hexdigest(), whole.hexdigest()
    return whole.hexdigest(), hashlib.md5(b"".join(parts), usedforsecurity=False).hexdigest() + f"-{len(parts)}"


def _manifest_entry(run, objects: list[dict]) -> dict:
    """A run as the manifest lists it: kind, name, experiment, status, start, commit, params (no secrets), objects."""
    return {
        "kind": run.data.tags.get(names.KIND),
        "run_name": run.info.run_name,
        "experiment_id": run.info.experiment_id,
        "status": run.info.status,
        "start_time": run.info.start_time,
        "source_commit": run.data.tags.get("mlflow.source.git.commit"),
        "params": {k: public(v) for k, v in sorted(run.data.params.items())},
        "objects": objects,
    }


def export(client, s3, bucket: str, prefix: str, runs: list) -> dict:
    """Upload the runs' artifacts and the manifest; the counts and the manifest."""
    existing = _existing(s3, bucket, prefix)
    counts = {"uploaded": 0, "skipped": 0}

    def put(key: str, path: Path) -> dict:
        """Upload `path` to `key` unless an object of the same size and content is there; its manifest entry."""
        size = path.stat().st_size
        md5, etag = digests(path, TRANSFER)
        if existing.get(key) == (size, etag):
            counts["skipped"] += 1
        else:
            s3.upload_file(
                str(path),
                bucket,
                key,
                Config=TRANSFER,
                ExtraArgs={"ContentType": mimetypes.guess_type(key)[0] or "application/octet-stream"},
            )
            counts["uploaded"] += 1
        return {"key": key, "size": size, "md5": md5}

    listed = {}
    for run in runs:
        run_id = run.info.run_id
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(client.download_artifacts(run_id, "", tmp))
            objects = [
                put(_key(prefix, run_id, path.relative_to(local).as_posix()), path)
                for path in sorted(p for p in local.rglob("*") if p.is_file())
            ]
        listed[run_id] = _manifest_entry(run, objects)
    manifest_key = _key(prefix, "manifest.json")
    previous = {}
    if manifest_key in existing:
        previous = json.loads(s3.get_object(Bucket=bucket, Key=manifest_key)["Body"].read())
    merged = {**previous.get("runs", {}), **listed}
    if merged == previous.get("runs"):
        manifest = previous
        counts["skipped"] += 1
    else:
        manifest = {
            "destination": f"s3://{bucket}/{prefix}",
            "tracking_uri": public(client.tracking_uri),
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "code_version": code_version(),
            "runs": merged,
        }
        with tempfile.TemporaryDirectory() as tmp:
            put(manifest_key, write_manifest(manifest, Path(tmp)))
    return {**counts, "manifest": manifest}


def write_manifest(manifest: dict, folder: Path) -> Path:
    """`folder`/manifest.json; its path."""
    path = folder / "manifest.json"
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return path


def main(argv=None) -> None:
    """Run the analysis: `python -m analysis.export ...` or `mlflow run . -e export`."""
    args = parser().parse_args(argv)
    settings = cli.settings_from(ExportSettings, args)
    bucket, prefix = parse_dest(settings.dest)
    client = tracking.connect(args.tracking_uri or None)
    runs = chosen_runs(
        client,
        [r.strip() for r in settings.run_ids.split(",") if r.strip()],
        settings.experiment,
        [k.strip() for k in settings.kinds.split(",") if k.strip()],
    )
    url = endpoint(settings.endpoint_url)
    try:
        s3 = boto3.client("s3", endpoint_url=url)
        s3.head_bucket(Bucket=bucket)
        result = export(client, s3, bucket, prefix, runs)
    except (BotoCoreError, ClientError) as err:
        raise s3_error(err, bucket, url) from None
    params = {
        "dest": settings.dest,
        "run_ids": ",".join(r.info.run_id for r in runs),
        "experiment": settings.experiment,
        "kinds": settings.kinds,
        "endpoint_url": public(url or ""),
    }
    metrics = {"uploaded": result["uploaded"], "skipped": result["skipped"], "n_runs": len(runs)}
    run_id = job.publish(client, names.EXPORT, params, partial(write_manifest, result["manifest"]), args.output_dir, metrics)
    print(
        f"exported {len(runs)} runs to {settings.dest}: uploaded {result['uploaded']}, skipped {result['skipped']} "
        f"(already there, same size and MD5)\nanalysis run: {run_id}"
    )


if __name__ == "__main__":
    raise SystemExit(job.run_main(main))
