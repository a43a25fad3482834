"""Prompt text -> ids, with ``<s>`` / ``</s>`` written in the text as the BOS / EOS control tokens.

Few-shot prompts and chat templates written as text spell the control tokens literally; HF's ``LlamaTokenizer``
(the reference of OpenAI-API clients and lm-eval's hf backend) reads them as the control ids. The server's
completion prompts and the lm-eval backend's ``tok_encode`` both encode through ``encode_prompt``.
"""

from __future__ import annotations

import re
from typing import Any

_SPECIAL = re.compile(r"(<s>|</s>)")


def encode_prompt(tokenizer: Any, text: str, bos: bool = True) -> list[int]:
    """Ids of ``text``: BOS first when ``bos`` unless the text starts with ``<s>``; literal ``<s>`` / ``</s>``
    become BOS / EOS and each text piece between them is encoded on its own (as HF's tokenizer does).

    Args:
      tokenizer: a ``mistral_jax.Tokenizer`` (``encode(text, bos=False)``, ``bos_id``, ``eos_id``).
      text: the prompt.
      bos: prepend BOS (Mistral: True), unless the text spells it first.
    """
    ids = [tokenizer.bos_id] if bos and not text.startswith("<s>") else []
    for piece in _SPECIAL.split(text):
        if piece == "<s>":
            ids.append(tokenizer.bos_id)
        elif piece == "</s>":
            ids.append(tokenizer.eos_id)
        elif piece:
            ids += tokenizer.encode(piece, bos=False)
    return ids
