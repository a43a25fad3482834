"""llama.cpp (llama-cpp-python) in a process of its own, for tests/test_gguf.py: the oracle's shared library is never
loaded into the pytest process, where its native runtime and XLA's compiler share an address space (a later XLA
compile in the same process crashed with a segmentation fault in CI).

Protocol: one JSON request per line on stdin, one JSON answer per line on stdout. Requests: ``open`` (path, n_ctx,
vocab_only) -> handle; ``logits`` (handle, ids) -> [T, V]; ``greedy`` (handle, ids, n) -> ids; ``tokenize`` (handle,
text, add_bos, special) -> ids; ``n_vocab`` (handle); ``chat`` (template, bos, eos, messages) -> the prompt text of
llama-cpp-python's Jinja2 chat formatter. ``LlamaProcess`` (below) is the test side.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

F32 = 0  # GGML_TYPE_F32: llama.cpp's K / V cache in float32 (its default float16 cache rounds beyond 1e-3)


def _serve() -> None:
    import llama_cpp
    import numpy as np
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    models: list[Any] = []
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        try:
            if op == "open":
                models.append(llama_cpp.Llama(model_path=req["path"], n_ctx=req["n_ctx"], logits_all=True,
                                              verbose=False, n_threads=2, seed=0, type_k=F32, type_v=F32,
                                              vocab_only=req["vocab_only"]))
                out: Any = len(models) - 1
            elif op == "chat":
                out = Jinja2ChatFormatter(req["template"], eos_token=req["eos"], bos_token=req["bos"])(
                    messages=req["messages"]).prompt
            else:
                llm = models[req["handle"]]
                if op == "logits":
                    llm.reset()
                    llm.eval(req["ids"])
                    out = np.asarray(llm.scores[: len(req["ids"])], np.float32).tolist()
                elif op == "greedy":
                    llm.reset()
                    llm.eval(req["ids"])
                    out = []
                    for _ in range(req["n"]):
                        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
                        llm.eval([out[-1]])
                elif op == "tokenize":
                    out = llm.tokenize(req["text"].encode(), add_bos=req["add_bos"], special=req["special"])
                elif op == "n_vocab":
                    out = llm.n_vocab()
                else:
                    raise ValueError(f"unknown op {op!r}")
            answer = {"ok": out}
        except Exception as e:  # noqa: BLE001 - the test side raises it
            answer = {"error": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


class LlamaProcess:
    """The worker, started once (``close`` ends it); ``Model`` handles answer as ``llama_cpp.Llama`` would."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)

    def call(self, **req: Any) -> Any:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the llama.cpp worker exited (status {self.proc.wait()})")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"llama.cpp worker: {answer['error']}")
        return answer["ok"]

    def open(self, path: str, n_ctx: int = 256, vocab_only: bool = False) -> Model:
        return Model(self, self.call(op="open", path=path, n_ctx=n_ctx, vocab_only=vocab_only))

    def chat(self, template: str, bos: str, eos: str, messages: list[dict[str, str]]) -> str:
        return self.call(op="chat", template=template, bos=bos, eos=eos, messages=messages)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class Model:
    def __init__(self, worker: LlamaProcess, handle: int):
        self.worker, self.handle = worker, handle

    def logits(self, ids: list[int]) -> list[list[float]]:
        return self.worker.call(op="logits", handle=self.handle, ids=[int(i) for i in ids])

    def greedy(self, ids: list[int], n: int) -> list[int]:
        return self.worker.call(op="greedy", handle=self.handle, ids=[int(i) for i in ids], n=n)

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        return self.worker.call(op="tokenize", handle=self.handle, text=text.decode(), add_bos=add_bos,
                                special=special)

    def n_vocab(self) -> int:
        return self.worker.call(op="n_vocab", handle=self.handle)


if __name__ == "__main__":
    _serve()
