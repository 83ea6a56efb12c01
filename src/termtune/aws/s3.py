"""Upload an artifact folder to S3 and prove the prefix holds exactly that artifact.

Each object carries its sha256 in user metadata (x-amz-meta-sha256), so a rerun after an
interrupted upload re-sends only the files that are missing or different, and the check
before importing compares content, not just names.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from termtune.errors import UserError
from termtune.rundir import sha256_file
from termtune.safepath import UnsafeName, inside

MANIFEST = "manifest.json"
TERMTUNE_FILES = (MANIFEST, "README.md")
"""termtune's own files (manifest, model card): uploaded beside the import prefix, never into it."""
META_FOLDER = "_termtune"
MiB = 1024 * 1024


@dataclass
class ArtifactFile:
    path: str  # relative to the artifact folder (and to the S3 prefix)
    size: int
    sha256: str


@dataclass
class UploadResult:
    uploaded: list[str]
    skipped: list[str]
    bytes_sent: int


def artifact_files(directory: Path) -> list[ArtifactFile]:
    """The files to upload: those named in manifest.json (its hashes are trusted only if the
    size matches), plus manifest.json itself. Without a manifest, every file, hashed here."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if manifest.is_file():
        try:
            entries = json.loads(manifest.read_text(encoding="utf-8"))["files"]
            known = {e["path"]: e for e in entries if isinstance(e["path"], str)}
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{manifest}: not a termtune manifest ({e}); re-run termtune export") from e
        if len(known) != len(entries):
            raise UserError(f"{manifest}: not a termtune manifest (a file path that is not a string, or "
                            "listed twice); re-run termtune export")
        names = list(known)
        names.append(MANIFEST)
    else:
        names = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
        known = {}
    files = []
    for name in names:
        try:  # a manifest entry (or a symlink in the folder) must not send a file from elsewhere to S3
            path = inside(directory, name, what=f"{directory}: the file")
        except UnsafeName as e:
            raise UserError(f"{e}; re-run termtune export") from e
        if not path.is_file():
            raise UserError(f"{manifest}: lists {name}, which is missing from {directory}; re-run termtune export")
        size = path.stat().st_size
        entry = known.get(name)
        digest = entry.get("sha256") if entry and entry.get("size") == size else None
        files.append(ArtifactFile(name, size, digest or sha256_file(path)))
    return files


def split_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/some/prefix/ -> ("bucket", "some/prefix/")."""
    rest = uri.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return bucket, prefix


def remote_objects(s3: Any, bucket: str, prefix: str) -> dict[str, int]:
    """key (relative to prefix) -> size, for every object under the prefix."""
    out: dict[str, int] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"][len(prefix):]] = obj["Size"]
    return out


def remote_sha256(s3: Any, bucket: str, key: str) -> str | None:
    return s3.head_object(Bucket=bucket, Key=key).get("Metadata", {}).get("sha256")


def upload(s3: Any, directory: Path, files: list[ArtifactFile], bucket: str, prefix: str,
           sse: str = "AES256", kms_key_id: str | None = None, progress: bool = True) -> UploadResult:
    """Send the files not already under the prefix with the same sha256, with boto3's
    transfer manager (multipart above 16 MiB, 8 parts in flight) and server-side encryption."""
    from boto3.s3.transfer import TransferConfig
    from tqdm import tqdm

    from termtune.progress import Lines, interactive

    present = remote_objects(s3, bucket, prefix)
    todo, skipped = [], []
    for f in files:
        if present.get(f.path) == f.size and remote_sha256(s3, bucket, prefix + f.path) == f.sha256:
            skipped.append(f.path)
        else:
            todo.append(f)

    extra: dict[str, Any] = {"ServerSideEncryption": sse}
    if sse == "aws:kms" and kms_key_id:
        extra["SSEKMSKeyId"] = kms_key_id
    transfer = TransferConfig(multipart_threshold=16 * MiB, multipart_chunksize=16 * MiB, max_concurrency=8)
    total = sum(f.size for f in todo)
    # a bar on a terminal; in a log, a line per ~10 % or ~30 s (the transfer manager calls back from its threads)
    tty = interactive()
    lines = Lines("upload (MiB)", round(total / MiB)) if progress and todo and not tty else None
    sent, lock = [0], threading.Lock()

    def log_line(n: int) -> None:
        with lock:
            sent[0] += n
            lines.update(round(sent[0] / MiB))

    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="upload",
              disable=not progress or not todo or not tty) as bar:
        for f in todo:
            s3.upload_file(str(Path(directory) / f.path), bucket, prefix + f.path, Config=transfer,
                           ExtraArgs={**extra, "Metadata": {"sha256": f.sha256}},
                           Callback=log_line if lines else bar.update)
    return UploadResult([f.path for f in todo], skipped, total)


def check_prefix(s3: Any, files: list[ArtifactFile], bucket: str, prefix: str, hashes: bool = True) -> None:
    """Refuse to import unless the prefix holds exactly the artifact: every file, same size,
    same sha256 (unless not `hashes`: objects termtune did not upload carry none), and nothing
    else (stray files may make the import fail, §1.3)."""
    present = remote_objects(s3, bucket, prefix)
    uri = f"s3://{bucket}/{prefix}"
    problems = []
    for f in files:
        if f.path not in present:
            problems.append(f"{f.path} missing")
        elif present[f.path] != f.size:
            problems.append(f"{f.path} has {present[f.path]} bytes, expected {f.size}")
        elif hashes and remote_sha256(s3, bucket, prefix + f.path) != f.sha256:
            problems.append(f"{f.path} has a different sha256")
    stray = sorted(set(present) - {f.path for f in files})
    if stray:
        problems.append(f"files not in the artifact: {', '.join(stray[:5])}")
    if problems:
        raise UserError(f"{uri} does not match the artifact's manifest ({'; '.join(problems[:5])}); "
                        "re-run termtune deploy to re-upload; for stray files run termtune cleanup or use another aws.prefix")


def delete_objects(s3: Any, bucket: str, prefix: str, names: set[str]) -> int:
    """Delete the objects under the prefix whose names are in `names`, and no other; returns how
    many were there (0 the second time)."""
    keys = [prefix + k for k in remote_objects(s3, bucket, prefix) if k in names]
    for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
        batch = [{"Key": k} for k in keys[start:start + 1000]]
        s3.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
    return len(keys)


def abort_uploads(s3: Any, bucket: str, prefix: str) -> int:
    """Abort every incomplete multipart upload under the prefix: an upload killed mid-way (SIGKILL,
    a lost machine) leaves its parts stored, and billed, until aborted. Returns how many were open."""
    from termtune.aws.clients import error_code

    count = 0
    for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
        for upload in page.get("Uploads", []):
            try:
                s3.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
            except Exception as e:
                if error_code(e) != "NoSuchUpload":  # completed or aborted since the listing: nothing left
                    raise
                continue
            count += 1
    return count


def download(s3: Any, bucket: str, prefix: str, target: Path) -> list[str]:
    """Copy every object under the prefix into `target` (used by termtune serve's import job).
    Every key is checked before anything is written: one that would land outside `target`
    (absolute, `..`, `//`, a backslash, ...) refuses the whole download (UnsafeName)."""
    paths = {name: inside(target, name, what=f"the object key under s3://{bucket}/{prefix}")
             for name in remote_objects(s3, bucket, prefix) if name and not name.endswith("/")}  # "x/": a folder marker
    for name, path in paths.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, prefix + name, str(path))
    return list(paths)
