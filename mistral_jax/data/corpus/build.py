"""Rebuild the bundled corpus from CPython's own documentation: ``python -m mistral_jax.data.corpus.build``.

Source: ``pydoc_data.topics.topics`` (the text behind ``help('topic')``, shipped with every CPython install),
Copyright Python Software Foundation, PSF License Agreement version 2 (see ``LICENSE``). Each topic is cut into
documents of whole paragraphs (up to ~1,500 characters), exact duplicates dropped; every 20th document goes
to the validation split.
The output depends on the Python version that builds it; the committed files were built with CPython 3.11.
"""

from __future__ import annotations

import json
import sys

from mistral_jax.data.corpus import TRAIN, VALIDATION

MAX_CHARS = 1500


def documents() -> list[dict[str, str]]:
    """The corpus as ``{"id", "text"}`` records in a fixed order."""
    from pydoc_data.topics import topics

    docs = []
    for name in sorted(topics):
        paragraphs = [p.strip("\n") for p in topics[name].split("\n\n") if p.strip()]
        chunk: list[str] = []
        for p in paragraphs:
            if chunk and sum(len(c) + 2 for c in chunk) + len(p) > MAX_CHARS:
                docs.append("\n\n".join(chunk))
                chunk = []
            chunk.append(p)
        if chunk:
            docs.append("\n\n".join(chunk))
    docs = list(dict.fromkeys(docs))  # some topics repeat paragraphs: drop exact duplicates (no train/val leak)
    return [{"id": f"pydoc-{i:05d}", "text": d} for i, d in enumerate(docs)]


def main() -> None:
    docs = documents()
    with open(TRAIN, "w", encoding="utf-8") as tr, open(VALIDATION, "w", encoding="utf-8") as va:
        for i, d in enumerate(docs):
            (va if i % 20 == 19 else tr).write(json.dumps(d, ensure_ascii=False) + "\n")
    print(f"{len(docs)} documents from CPython {sys.version.split()[0]} -> {TRAIN}, {VALIDATION}")


if __name__ == "__main__":
    main()
