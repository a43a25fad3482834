"""Where the project's files may live: local (or mounted) paths only, for now.

A URL such as ``gs://bucket/run`` or ``s3://bucket/run`` is never taken for a local path: without this check,
``os.makedirs("gs://bucket/run")`` creates ``./gs:/bucket/run`` and a run trains into it (and a multi-host pod
would write each host's checkpoint shards to its own disk). Every path the project reads or writes is checked
here first, before any work: by the command-line tools as they parse their flags (``cli.Parser``,
``cli.check_local_flags``), by the run config checks (``training.run``) and by the library's entry points
(``load_pretrained``, ``save_*``, ``convert``, ``train``). Object storage through ``etils.epath`` is the next step
(the issue "Object storage everywhere"); it replaces the refusal scheme by scheme.
"""

from __future__ import annotations

import os
import re
from typing import Any

# ``scheme://``: RFC 3986's scheme syntax followed by "//". Windows drive letters ("C:\\") and the project's own
# names ("mistral:v3", "hf:...") have no "//" and are not URLs.
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")

FIX = ("pass a local path, or mount the bucket (e.g. gcsfuse on every host) and pass the mounted path: this "
       "version of mistral_jax reads and writes local files only")


class UnsupportedPath(ValueError):
    """A path the project cannot open (a URL of object storage or any other scheme), refused before any work."""


def url_scheme(path: Any) -> str | None:
    """The scheme of ``path`` when it is a URL (``"gs"`` for ``gs://b/x``), else None (local paths, names)."""
    if not isinstance(path, (str, os.PathLike)):
        return None
    m = _URL.match(os.fspath(path))
    return m.group(1).lower() if m else None


def check_local(path: Any, what: str) -> None:
    """Raise ``UnsupportedPath`` naming ``what`` (e.g. ``"--workdir"``, ``"config.init_from"``) when ``path`` is
    a URL; lists and tuples of paths are checked element by element."""
    for p in path if isinstance(path, (list, tuple)) else [path]:
        scheme = url_scheme(p)
        if scheme is not None:
            raise UnsupportedPath(f"{what}={os.fspath(p)!r} is a {scheme}:// URL, which this version cannot open "
                                  f"(it would be taken for a local directory named '{scheme}:'). Fix: {FIX}.")
