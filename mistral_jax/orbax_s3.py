"""Orbax checkpoints on ``s3://``: what Orbax 0.12 lacks, added here and nowhere else.

Orbax writes ``gs://`` arrays with tensorstore's GCS driver, but gives any other URL to tensorstore's *file*
driver after ``os.path.normpath`` (``s3://b/x`` becomes ``s3:/b/x``, refused as "not absolute"). Tensorstore has
an S3 driver of its own; ``install()`` routes ``s3://`` paths to it:

* ``tensorstore_utils._normalize_path`` keeps the ``s3://`` prefix;
* ``tensorstore_utils._use_gcs_driver`` ("a remote kvstore, no local path checks") is true for ``s3://`` too;
* ``atomicity_defaults``: a save to ``s3://`` uses the commit-file protocol (``commit_success.txt`` written
  last), as on GCS, instead of a directory rename, which S3 does not have;
* ``gcs_utils.get_kvstore_for_gcs`` returns the S3 driver's spec for an ``s3://`` path, with the endpoint of
  ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (a local emulator such as moto) when one is set.

Everything else about ``s3://`` (listing steps, metadata files, deleting old steps) goes through
``etils.epath`` over s3fs, as for any path. Idempotent; a no-op for every other path.
"""

from __future__ import annotations

import os
from typing import Any

_installed = False


def s3_kvstore(path: str) -> dict[str, Any]:
    """tensorstore's S3 kvstore spec for ``s3://bucket/key...``."""
    rest = path.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    spec: dict[str, Any] = {"driver": "s3", "bucket": bucket, "path": key}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        spec["endpoint"] = endpoint
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        # keys in the environment: read them there (tensorstore's default chain first logs an error for every
        # missing ~/.aws file, on every write)
        spec["aws_credentials"] = {"type": "environment"}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        spec["aws_region"] = region
    return spec


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    from orbax.checkpoint._src.path import atomicity, atomicity_defaults, gcs_utils
    from orbax.checkpoint._src.serialization import tensorstore_utils as tsu

    normalize, use_remote, gcs_kvstore = tsu._normalize_path, tsu._use_gcs_driver, gcs_utils.get_kvstore_for_gcs

    def _normalize_path(path: str) -> str:
        p = str(path)
        return "s3://" + os.path.normpath(p[5:]) if p.startswith("s3://") else normalize(path)

    def _use_gcs_driver(directory: str) -> bool:
        return str(directory).startswith("s3://") or use_remote(directory)

    def get_kvstore_for_gcs(ckpt_path: str) -> dict[str, Any]:
        return s3_kvstore(str(ckpt_path)) if str(ckpt_path).startswith("s3://") else gcs_kvstore(ckpt_path)

    def commit_file_on_s3(default):
        def chosen(path, *args, **kwargs):
            if str(path).startswith("s3://") and not kwargs.get("atomicity_options"):
                return atomicity.CommitFileTemporaryPath
            return default(path, *args, **kwargs)
        return chosen

    atomicity_defaults.get_default_temporary_path_class = commit_file_on_s3(
        atomicity_defaults.get_default_temporary_path_class)
    atomicity_defaults.get_item_default_temporary_path_class = commit_file_on_s3(
        atomicity_defaults.get_item_default_temporary_path_class)
    tsu._normalize_path, tsu._use_gcs_driver, gcs_utils.get_kvstore_for_gcs = (
        _normalize_path, _use_gcs_driver, get_kvstore_for_gcs)
