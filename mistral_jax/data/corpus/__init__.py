"""Bundled license-clean corpus: CPython's documentation topics (PSF License 2.0; see LICENSE and ATTRIBUTION).

``TRAIN`` and ``VALIDATION`` are JSON-lines files with one ``{"id", "text"}`` document per line.
"""

import os

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(HERE, "pydoc_train.jsonl")
VALIDATION = os.path.join(HERE, "pydoc_validation.jsonl")
