"""Where the project's files live: local paths, and buckets (``gs://``, ``s3://``) through one path layer.

Every file the project reads or writes goes through ``etils.epath`` (what Orbax itself uses) over fsspec
(``gcsfs`` for ``gs://``, ``s3fs`` for ``s3://``); Orbax writes arrays with tensorstore's own GCS / S3 drivers.

* ``path(p)``: an ``epath.Path`` for a local path or a bucket URL (``configure()`` is applied first).
* ``join(base, *parts)``: string paths joined without breaking ``gs://``.
* ``check_supported(p, what)``: a scheme the project cannot open (``http://``, ``hdfs://``, ...), or a bucket
  scheme whose filesystem package is not installed, is refused in one line before any work (``UnsupportedPath``):
  a URL is never taken for a local directory named ``"gs:"``.
* ``check_bucket(p, what)``: a bucket path is reachable (endpoint answers, bucket exists, credentials found),
  else ``StorageError`` with one line naming the bucket, what failed and the fix. Fast: a TCP probe of the
  endpoint first, so a stopped endpoint fails in seconds, not after a minute of client retries.
* ``create_exclusive(p, data)``: write ``p`` only if it does not exist (``O_EXCL`` locally, GCS
  ``ifGenerationMatch=0``, S3 ``If-None-Match: *``); returns False when it exists. The workdir lock uses it.
* ``cache_dir()``: the one local directory the project writes into when the workdir is a bucket
  (``$MISTRAL_JAX_CACHE``, default ``~/.cache/mistral_jax``), e.g. for staging files that buckets cannot append to.

Emulators: ``STORAGE_EMULATOR_HOST`` (GCS: gcsfs, google-cloud-storage; tensorstore's ``TENSORSTORE_GCS_HTTP_URL``
defaults to it) and ``AWS_ENDPOINT_URL`` (S3: s3fs, boto3 and the tensorstore S3 driver) point everything at a
local server, as the tests do with ``fake-gcs-server`` and ``moto``.

Credentials are the standard ones: Application Default Credentials on GCP (``gcloud auth application-default
login``, or a TPU VM's service account), the AWS variables / profiles for S3. Nothing here logs them.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import re
import socket
import sys
import threading
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger(__name__)


def _after_fork_in_child() -> None:
    """A forked child (prepare's workers) must not use the parent's bucket clients: fsspec's async filesystems
    refuse another process ("not fork-safe"), and etils.epath caches one filesystem per protocol. Drop that cache
    (fsspec drops its own instance cache by itself)."""
    backend = sys.modules.get("etils.epath.backend")  # not imported yet: nothing cached
    if backend is not None:
        backend._FileSystemSpecBackend._get_filesystem.cache_clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

# ``scheme://``: RFC 3986's scheme syntax followed by "//". Windows drive letters ("C:\\") and the project's own
# names ("mistral:v3", "hf:...") have no "//" and are not URLs.
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")

# The bucket schemes this project reads and writes, with the fsspec package that opens them.
BUCKETS = {"gs": "gcsfs", "s3": "s3fs"}

FIX = ("pass a local path, a gs://bucket/... or an s3://bucket/... path (or mount the storage, e.g. with gcsfuse "
       "on every host, and pass the mounted path)")


class UnsupportedPath(ValueError):
    """A path the project cannot open (an unknown scheme, or a bucket scheme without its package): refused
    before any work."""


class StorageError(RuntimeError):
    """A bucket path that cannot be used: endpoint unreachable, bucket missing, no credentials, no permission.

    The message is one line: the path and what it is for, what failed, and the fix."""


def url_scheme(path: Any) -> str | None:
    """The scheme of ``path`` when it is a URL (``"gs"`` for ``gs://b/x``), else None (local paths, names)."""
    if not isinstance(path, (str, os.PathLike)):
        return None
    m = _URL.match(os.fspath(path))
    return m.group(1).lower() if m else None


def is_remote(path: Any) -> bool:
    """Whether ``path`` is a bucket URL (``gs://``, ``s3://``)."""
    return url_scheme(path) in BUCKETS


def bucket_of(path: Any) -> str:
    """``"bkt"`` of ``gs://bkt/a/b``."""
    return urlparse(os.fspath(path)).netloc


def _paths(path: Any) -> list:
    return list(path) if isinstance(path, (list, tuple)) else [path]


def check_supported(path: Any, what: str) -> None:
    """Raise ``UnsupportedPath`` naming ``what`` (e.g. ``"--workdir"``) when ``path`` (or any element of a list)
    is a URL the project cannot open: a scheme other than ``gs`` / ``s3``, or one whose package is missing."""
    for p in _paths(path):
        scheme = url_scheme(p)
        if scheme is None:
            continue
        if scheme not in BUCKETS:
            raise UnsupportedPath(f"{what}={os.fspath(p)!r} is a {scheme}:// URL, which mistral_jax cannot open "
                                  f"(it would be taken for a local directory named '{scheme}:'). Fix: {FIX}.")
        package = BUCKETS[scheme]
        try:
            __import__(package)
        except ImportError:
            raise UnsupportedPath(f"{what}={os.fspath(p)!r} needs the {package} package, which is not installed. "
                                  f"Fix: pip install {package} (for s3fs: pip install 'mistral_jax[s3]').") from None


def check_local(path: Any, what: str) -> None:
    """Raise ``UnsupportedPath`` when ``path`` is any URL: for the few paths that must be on the local disk."""
    for p in _paths(path):
        scheme = url_scheme(p)
        if scheme is not None:
            raise UnsupportedPath(f"{what}={os.fspath(p)!r} is a {scheme}:// URL, but {what} must be a local path. "
                                  "Fix: pass a local path (copy the file from the bucket first).")


def join(base: Any, *parts: str) -> str:
    """``base/parts...`` as a string; URLs keep their ``scheme://`` (``os.path.join`` does too, ``normpath`` not)."""
    out = os.fspath(base)
    for part in parts:
        out = out.rstrip("/") + "/" + str(part).lstrip("/") if is_remote(out) else os.path.join(out, part)
    return out


def absolute(path: Any) -> str:
    """A local path made absolute; a bucket URL unchanged (without a trailing slash)."""
    p = os.fspath(path)
    return p.rstrip("/") if is_remote(p) else os.path.abspath(p)


# --------------------------------------------------------------------------------------------- configuration
_configured = False
_config_lock = threading.Lock()
_QUIET_LOGGERS = ("gcsfs", "google.auth", "google.auth.compute_engine._metadata", "s3fs", "aiobotocore",
                  "botocore.credentials", "fsspec")


def configure() -> None:
    """Once per process, before any bucket access: emulator defaults, quiet client libraries, Orbax on ``s3://``.

    * Under ``STORAGE_EMULATOR_HOST``: tensorstore's ``TENSORSTORE_GCS_HTTP_URL`` defaults to it, its credential
      lookup is skipped (``GOOGLE_AUTH_TOKEN_FOR_TESTING``), and gcsfs's bucket-type probe over gRPC (which no
      emulator speaks: a minute of timeouts per bucket) is off (``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``);
      ArrayRecord's GCS reader (google-cloud-cpp) follows ``CLOUD_STORAGE_EMULATOR_ENDPOINT``, set to it as well.
    * fsspec's listing caches are off for buckets (other writers, tensorstore among them, change them).
    * The client libraries' credential-discovery and retry warnings are kept off the normal path (ERROR only).
    * Orbax writes ``s3://`` arrays with tensorstore's S3 driver (``orbax_s3``).
    """
    global _configured
    with _config_lock:
        if _configured:
            return
        _configured = True
        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        if emulator:
            os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", emulator)
            os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
            os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
            os.environ.setdefault("CLOUD_STORAGE_EMULATOR_ENDPOINT", emulator)  # ArrayRecord's GCS reader
        # No listing caches: Orbax writes through tensorstore, which no fsspec instance sees, and epath holds an
        # fsspec instance of its own; a cached listing would report a committed checkpoint as missing.
        import fsspec.config

        for protocol in ("gs", "gcs", "s3", "s3a"):
            fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)
        for name in _QUIET_LOGGERS:
            if os.environ.get("MISTRAL_JAX_DEBUG", "") in ("", "0"):
                logging.getLogger(name).setLevel(logging.ERROR)
        from mistral_jax import orbax_s3

        orbax_s3.install()


def ready(p: Any) -> None:
    """``configure()`` when ``p`` is a bucket URL: before handing it to a library that opens it itself (Orbax)."""
    if is_remote(p):
        configure()


def path(p: Any):
    """``etils.epath.Path`` of a local path or a ``gs://`` / ``s3://`` URL (checked by ``check_supported``)."""
    check_supported(p, "path")
    if is_remote(p):
        configure()
    from etils import epath

    return epath.Path(os.fspath(p))


def filesystem(scheme: str):
    """The fsspec filesystem of a bucket scheme (one instance per process, as fsspec caches them)."""
    configure()
    import fsspec

    return fsspec.filesystem(scheme)


def fs_and_key(p: Any) -> tuple[Any, str]:
    """``(fsspec filesystem, "bucket/key")`` of a bucket URL: for what ``epath.Path`` does not offer (conditional
    writes, ranged reads, listings with sizes, globs)."""
    p = os.fspath(p)
    return filesystem(url_scheme(p)), p.split("://", 1)[1]


# --------------------------------------------------------------------------------------------- files
def create_exclusive(p: Any, data: bytes) -> bool:
    """Write ``data`` to ``p`` only if nothing is there; False if it exists (another writer won the race).

    Locally ``O_CREAT | O_EXCL``; on GCS a ``ifGenerationMatch=0`` upload, on S3 ``If-None-Match: *``: the store
    itself decides, so two hosts cannot both succeed."""
    p = os.fspath(p)
    if not is_remote(p):
        os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
        try:
            fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    fs, key = fs_and_key(p)
    try:
        fs.pipe_file(key, data, mode="create")
    except FileExistsError:
        return False
    fs.invalidate_cache(key)
    return True


def read_bytes(p: Any) -> bytes:
    return path(p).read_bytes()


def write_bytes(p: Any, data: bytes) -> None:
    """Write a whole file (a bucket object is replaced in one request: readers see the old or the new one)."""
    q = path(p)
    if not is_remote(p):
        q.parent.mkdir(parents=True, exist_ok=True)
    q.write_bytes(data)


def remove(p: Any, *, missing_ok: bool = True) -> None:
    try:
        path(p).unlink()
    except FileNotFoundError:
        if not missing_ok:
            raise


def cache_dir(*parts: str) -> str:
    """``$MISTRAL_JAX_CACHE`` (default ``~/.cache/mistral_jax``) joined with ``parts``, created."""
    root = os.environ.get("MISTRAL_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mistral_jax")
    out = os.path.join(root, *parts)
    os.makedirs(out, exist_ok=True)
    return out


# --------------------------------------------------------------------------------------------- reachability
def endpoint(scheme: str) -> tuple[str, int, str]:
    """``(host, port, url)`` the client of ``scheme`` talks to: the emulator's when one is set."""
    if scheme == "gs":
        url = os.environ.get("STORAGE_EMULATOR_HOST") or "https://storage.googleapis.com"
        if "://" not in url:
            url = "http://" + url
    else:
        url = (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
               or "https://s3.amazonaws.com")
    u = urlparse(url)
    return u.hostname or "", u.port or (443 if u.scheme == "https" else 80), url


def _credential_fix(scheme: str) -> str:
    if scheme == "gs":
        return ("run `gcloud auth application-default login` (or set GOOGLE_APPLICATION_CREDENTIALS to a service "
                "account key; on a TPU VM the VM's service account is used)")
    return "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), as for the aws command"


def _describe(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__


def _is_credentials_error(err: BaseException) -> bool:
    names = {type(e).__name__ for e in _chain(err)}
    return bool(names & {"DefaultCredentialsError", "NoCredentialsError", "PartialCredentialsError",
                         "RefreshError", "TransportError"})


def _is_permission_error(err: BaseException) -> bool:
    return any(isinstance(e, PermissionError) or "403" in str(e)[:20] or "AccessDenied" in str(e)
               for e in _chain(err))


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


@functools.lru_cache(maxsize=64)
def _probe_endpoint(host: str, port: int) -> str | None:
    """Why a TCP connection to the endpoint fails (None when it connects); cached per process."""
    try:
        with socket.create_connection((host, port), timeout=float(os.environ.get("MISTRAL_JAX_STORAGE_TIMEOUT",
                                                                                  "10"))):
            return None
    except OSError as e:
        if e.errno == errno.ECONNREFUSED:
            return "connection refused"
        return e.strerror or type(e).__name__


def check_bucket(p: Any, what: str, *, write: bool = False) -> None:
    """For a bucket path: its endpoint answers, its bucket exists, credentials are found (and, with ``write``,
    an object can be created and deleted under ``p``). Local paths and names pass. One line, exit 2 in the tools:

    Raises:
      UnsupportedPath: not a scheme the project opens (``check_supported``).
      StorageError: which bucket, what failed, how to fix it.
    """
    for item in _paths(p):
        check_supported(item, what)
        if not is_remote(item):
            continue
        item = os.fspath(item)
        scheme, bucket = url_scheme(item), bucket_of(item)
        host, port, url = endpoint(scheme)
        why = _probe_endpoint(host, port)
        if why is not None:
            env = "STORAGE_EMULATOR_HOST" if scheme == "gs" else "AWS_ENDPOINT_URL"
            raise StorageError(f"{what}={item!r}: cannot reach the {scheme}:// endpoint {url} ({why}). Fix: check "
                               f"the network (and {env}, if you use an emulator or another endpoint), then rerun.")
        fs = filesystem(scheme)
        try:
            exists = fs.exists(bucket) if scheme == "s3" else bool(fs.info(bucket))
        except FileNotFoundError:
            exists = False
        except Exception as e:  # noqa: BLE001 - every failure is reported as one line
            if _is_credentials_error(e):
                raise StorageError(f"{what}={item!r}: no credentials for {scheme}://{bucket} ({_describe(e)}). "
                                   f"Fix: {_credential_fix(scheme)}.") from None
            if _is_permission_error(e):
                raise StorageError(f"{what}={item!r}: permission denied on {scheme}://{bucket} ({_describe(e)}). "
                                   "Fix: grant this account access to the bucket (storage.objectAdmin on GCS, "
                                   "s3:GetObject/PutObject/ListBucket/DeleteObject on S3).") from None
            raise StorageError(f"{what}={item!r}: {scheme}://{bucket} cannot be read ({_describe(e)}). Fix: check "
                               "the bucket name, the network and the credentials, then rerun.") from None
        if not exists:
            make = f"gcloud storage buckets create gs://{bucket}" if scheme == "gs" else f"aws s3 mb s3://{bucket}"
            raise StorageError(f"{what}={item!r}: the bucket {scheme}://{bucket} does not exist. Fix: create it "
                               f"({make}) or correct the name.")
        if write:
            probe = join(item, f".write_test.{os.getpid()}.{socket.gethostname()}")
            try:
                fs.pipe_file(probe.split("://", 1)[1], b"")
                fs.rm_file(probe.split("://", 1)[1])
            except Exception as e:  # noqa: BLE001
                raise StorageError(f"{what}={item!r} cannot be written ({_describe(e)}). Fix: grant this account "
                                   f"write access to {scheme}://{bucket}, or pass another path.") from None


@contextlib.contextmanager
def local_copy_for_reading(p: Any, suffix: str = ""):
    """A local file holding ``p``'s bytes, for readers that only take a filename (sentencepiece, ...): ``p``
    itself when it is local, else a temporary file in ``cache_dir("tmp")`` removed afterwards."""
    if not is_remote(p):
        yield os.fspath(p)
        return
    import tempfile

    fd, tmp = tempfile.mkstemp(suffix=suffix or os.path.splitext(os.fspath(p))[1], dir=cache_dir("tmp"))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(read_bytes(p))
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
