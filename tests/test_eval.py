"""eval.py / the ``mistral_jax`` lm-eval backend against lm-eval's own ``hf`` backend on the same exported weights.

A tiny random model is exported to HF (``mj.save_hf``, with the shared word-level tokenizer
``make_tokenizer("words")``: one piece per word, so a task's prompts have equal lengths); local task
YAMLs over json files made here cover multiple choice, generate_until and loglikelihood_rolling. The oracle is
``lm_eval.simple_evaluate(model="hf", ...)`` on the export in float32 on CPU.
"""

from __future__ import annotations

import glob
import importlib
import json
import os
import random
import shutil
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import mistral_jax as mj
from mistral_jax.evals import presets
from mistral_jax.evals.lm import MistralJaxLM
from mistral_jax.evals.run import DatasetUnavailableError, evaluate, load_tasks
from tests.helpers import WORDS, mc_task_yaml, ppl_task_yaml

# lm-eval is imported at the top (mistral_jax.evals is its backend): conftest.py leaves this file out of the light tier
pytestmark = pytest.mark.oracle

ATOL = 1e-4
TASKS = ["local_mc", "local_gen", "local_ppl"]

GEN_YAML = """task: local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def env(tmp_path_factory, make_tokenizer):
    from lm_eval.tasks import TaskManager

    root = tmp_path_factory.mktemp("eval")
    # Word-level (WORDS): a task's prompts have equal token lengths, so test_compilations_independent_of_sample_count
    # sees the same length buckets for 3 and for 16 samples (with the subword tokenizer_path: 32 vs 35 compilations).
    tok_path = make_tokenizer("words")
    rng = random.Random(0)
    # max_seq_len 96 (= HF max_position_embeddings = both backends' max_length): rolling windows roll; window 16
    # < prompts; initializer_range 0.2 spreads the logits so greedy argmax has no near-ties between backends.
    cfg = mj.ModelConfig.tiny(max_seq_len=96, initializer_range=0.2)
    model = mj.Transformer(cfg, rngs=nnx.Rngs(0))
    export = str(root / "hf")
    mj.save_hf(model, export, tokenizer=tok_path)

    data = root / "data"
    data.mkdir()
    mc = [{"question": _sentence(rng, 4), "choices": [_sentence(rng, rng.randint(1, 3)) for _ in range(4)],
           "label": rng.randrange(4)} for _ in range(16)]
    gen = [{"question": _sentence(rng, 3), "answer": rng.choice(WORDS)} for _ in range(16)]
    ppl = [{"text": _sentence(rng, rng.randint(20, 150)) + "."} for _ in range(6)]
    tasks = root / "tasks"
    tasks.mkdir()
    for name, rows, yaml in (("mc", mc, lambda data: mc_task_yaml("local_mc", data, ("acc", "acc_norm"))),
                             ("gen", gen, GEN_YAML.format),
                             ("ppl", ppl, lambda data: ppl_task_yaml("local_ppl", data, ("word_perplexity",
                                                                                         "byte_perplexity")))):
        with open(data / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        (tasks / f"local_{name}.yaml").write_text(yaml(data=data / f"{name}.jsonl"))
    tm = TaskManager(include_path=str(tasks))  # with the built-in index too: the offline tests need hub tasks
    return dict(root=root, export=export, cfg=cfg, model=model, tok_path=tok_path, tm=tm, gen_rows=gen)


@pytest.fixture(scope="module")
def ours(env):
    lm = MistralJaxLM(env["export"], batch_size=8)  # loads through mj.load_pretrained; 8 devices -> sharded
    out = str(env["root"] / "out")
    return evaluate(lm=lm, tasks=TASKS, task_manager=env["tm"], log_samples=True, output_path=out, verbose=False)


def hf_lm(path: str):
    """lm-eval's own ``hf`` backend over the HF export at ``path`` (``--model hf --model_args
    pretrained=PATH,dtype=float32,device=cpu``): model, tokenizer and every request handled by lm-eval's code."""
    from lm_eval.api.registry import get_model

    return get_model("hf").create_from_arg_string(f"pretrained={path},dtype=float32,device=cpu",
                                                  {"batch_size": 8})


@pytest.fixture(scope="module")
def ref(env):
    import lm_eval

    return lm_eval.simple_evaluate(model=hf_lm(env["export"]), tasks=TASKS, task_manager=env["tm"],
                                   log_samples=True, bootstrap_iters=0)


def _by_doc(samples):
    return {s["doc_id"]: s for s in samples}


@pytest.mark.slow
def test_backend_is_registered_and_built_from_model_args(env):
    from lm_eval.api.registry import get_model

    assert get_model("mistral_jax") is MistralJaxLM
    lm = MistralJaxLM.create_from_arg_string(f"pretrained={env['export']},max_length=64",
                                             {"batch_size": 3, "max_batch_size": None, "device": "cpu"})
    assert lm.cfg.to_hf() == env["cfg"].to_hf() and lm.max_length == 64 and lm.batch_size == 8  # 3 -> 8 devices
    with pytest.raises(TypeError, match="unknown model_args"):
        MistralJaxLM(model=env["model"], tokenizer=env["tok_path"], temprature=0.5)


@pytest.mark.slow
def test_tokenisation_matches_hf_tokenizer(env):
    """Encode and decode agree with the HF tokenizer lm-eval's hf backend loads from the export (random ids
    include byte-fallback runs that are invalid UTF-8, control and unknown ids)."""
    import transformers

    hf_tok = transformers.AutoTokenizer.from_pretrained(env["export"])
    lm = MistralJaxLM(model=env["model"], tokenizer=env["tok_path"])
    rng = random.Random(1)
    texts = [_sentence(rng, rng.randint(1, 20)) + rng.choice(["", ".", "?", "\n", " 42", " café"]) for _ in range(200)]
    for text in texts:
        assert lm.tok_encode(text) == hf_tok.encode(text)
    n = lm.tokenizer.vocab_size
    for _ in range(500):
        ids = [rng.randrange(n) for _ in range(rng.randint(1, 12))]
        assert lm.tok_decode(ids) == hf_tok.decode(ids, skip_special_tokens=True), ids


@pytest.mark.slow
def test_multiple_choice_matches_hf(ours, ref):
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["local_mc"][metric] == ref["results"]["local_mc"][metric]
    a, b = _by_doc(ours["samples"]["local_mc"]), _by_doc(ref["samples"]["local_mc"])
    assert sorted(a) == sorted(b) and len(a) == 16
    ll_a = np.array([[float(r[0][0]) for r in a[d]["resps"]] for d in sorted(a)])  # [docs, choices]
    ll_b = np.array([[float(r[0][0]) for r in b[d]["resps"]] for d in sorted(b)])
    assert ll_a.shape == (16, 4) and np.all(ll_a < 0)
    np.testing.assert_allclose(ll_a, ll_b, atol=ATOL, rtol=0)
    greedy_a = [[str(r[0][1]) for r in a[d]["resps"]] for d in sorted(a)]
    assert greedy_a == [[str(r[0][1]) for r in b[d]["resps"]] for d in sorted(b)]
    for d in a:  # same prompts and targets: the two backends saw the same requests
        assert a[d]["arguments"] == b[d]["arguments"]


@pytest.mark.slow
def test_generate_until_matches_hf(ours, ref):
    a, b = _by_doc(ours["samples"]["local_gen"]), _by_doc(ref["samples"]["local_gen"])
    assert sorted(a) == sorted(b) and len(a) == 16
    gens_a = [a[d]["resps"][0][0] for d in sorted(a)]
    assert gens_a == [b[d]["resps"][0][0] for d in sorted(b)]
    assert sum(bool(g.strip()) for g in gens_a) >= 8, gens_a  # not vacuous: most rows generate text
    assert ours["results"]["local_gen"]["exact_match,none"] == ref["results"]["local_gen"]["exact_match,none"]


@pytest.mark.slow
def test_loglikelihood_rolling_matches_hf(ours, ref, env):
    a, b = _by_doc(ours["samples"]["local_ppl"]), _by_doc(ref["samples"]["local_ppl"])
    ll_a = np.array([float(a[d]["resps"][0][0]) for d in sorted(a)])
    ll_b = np.array([float(b[d]["resps"][0][0]) for d in sorted(b)])
    # Each value sums the log-probs of a whole document (hundreds of tokens), so float32 rounding grows with
    # its size: a relative tolerance of 1e-6 on top of the per-token atol (seen: 1.2e-4 on -575.29).
    np.testing.assert_allclose(ll_a, ll_b, atol=ATOL, rtol=1e-6)
    lm = MistralJaxLM(model=env["model"], tokenizer=env["tok_path"])
    assert max(len(lm.tok_encode(a[d]["doc"]["text"])) for d in a) > lm.max_length  # some docs span 2+ windows
    np.testing.assert_allclose(ours["results"]["local_ppl"]["word_perplexity,none"],
                               ref["results"]["local_ppl"]["word_perplexity,none"], rtol=1e-4)


@pytest.mark.slow
def test_outputs_written_like_lm_eval(ours, env):
    files = glob.glob(str(env["root"] / "out" / "**" / "*"), recursive=True)
    results = [f for f in files if os.path.basename(f).startswith("results_") and f.endswith(".json")]
    assert len(results) == 1
    with open(results[0]) as f:
        saved = json.load(f)
    assert saved["results"]["local_mc"]["acc,none"] == ours["results"]["local_mc"]["acc,none"]
    assert saved["config"]["mistral_jax"]["score_compilations"] >= 1
    for task in TASKS:
        (path,) = [f for f in files if os.path.basename(f).startswith(f"samples_{task}_")]
        with open(path) as f:
            rows = [json.loads(line) for line in f]
        assert len(rows) == {"local_mc": 16, "local_gen": 16, "local_ppl": 6}[task]


def _run_counting(env, limit):
    jax.clear_caches()  # count every compilation this run needs, not only those missing from earlier runs
    lm = MistralJaxLM(model=env["model"], tokenizer=env["tok_path"], batch_size=8)
    res = evaluate(lm=lm, tasks=["local_mc", "local_gen"], limit=limit, task_manager=env["tm"], verbose=False)
    return res["config"]["mistral_jax"]


@pytest.mark.slow
def test_compilations_independent_of_sample_count(env):
    few, many = _run_counting(env, 3), _run_counting(env, 16)
    assert few["score_shapes"] == many["score_shapes"]  # one scoring compilation per length bucket
    assert 1 <= few["score_compilations"] == many["score_compilations"] <= 3
    assert all(s[0] == 8 for s in few["score_shapes"])  # fixed batch of 8 rows
    assert few["xla_compilations"] == many["xla_compilations"]  # generation included (all jit + eager compiles)


@pytest.mark.slow
def test_cli_main(env, monkeypatch, capsys):
    import lm_eval.tasks

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda include_path=None, **kw: env["tm"])  # skip re-indexing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cli = importlib.import_module("eval")
    out = str(env["root"] / "cli_out")
    argv = ["eval.py", f"--checkpoint={env['export']}", "--tasks=local_mc", "--limit=4", "--batch_size=8",
            f"--output_path={out}", "--log_samples", "--seed=0", "--num_fewshot=1"]
    cli.FLAGS(argv)
    assert cli.main(argv[:1]) == 0
    (path,) = glob.glob(os.path.join(out, "**", "results_*.json"), recursive=True)
    with open(path) as f:
        saved = json.load(f)
    assert saved["n-shot"]["local_mc"] == 1 and saved["n-samples"]["local_mc"]["effective"] == 4
    assert glob.glob(os.path.join(out, "**", "samples_local_mc_*.jsonl"), recursive=True)
    assert "local_mc" in capsys.readouterr().out


@pytest.mark.slow
def test_offline_hub_task_error_names_task(env):
    with pytest.raises(DatasetUnavailableError, match=r"(?s)task 'arc_easy'.*ai2_arc.*pre-download"):
        load_tasks(env["tm"], ["arc_easy"])
    lm = MistralJaxLM(model=env["model"], tokenizer=env["tok_path"])
    with pytest.raises(DatasetUnavailableError) as err:  # the suite: every unavailable benchmark in one error
        evaluate(lm=lm, suite="mistral_paper", task_manager=env["tm"], limit=2, verbose=False)
    for task in ("hellaswag", "winogrande", "arc_challenge", "nq_open", "gsm8k_cot_self_consistency", "mmlu"):
        assert f"task {task!r}" in str(err.value)
    assert "TaskManager().load([" in str(err.value)


# Mistral's v1 instruct format as an HF chat template; test_chat_template_is_mistral_commons checks it against
# mistral-common (Mistral's own library), so the HF oracle below uses Mistral's format, not one of ours.
MISTRAL_V1_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")
CONVERSATIONS = [
    [{"role": "user", "content": "what color is the cat"}],
    [{"role": "user", "content": "what color is the cat"}, {"role": "assistant", "content": "red"},
     {"role": "user", "content": "which dog runs"}],
    [{"role": "user", "content": "Ünïcödé 東京 ✓ and code: def f(x): return x"},
     {"role": "assistant", "content": "Ok, 42."}, {"role": "user", "content": "Again, shorter?"}],
]


@pytest.mark.slow
def test_chat_template_is_mistral_commons(tmp_path):
    """Our eval chat path, the SFT renderer and MISTRAL_V1_TEMPLATE (through transformers) give mistral-common's
    ``encode_chat_completion`` ids with Mistral's real v1 tokenizer."""
    import transformers
    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from mistral_jax.data.chat import render_prompt

    mistral = MistralTokenizer.v1()
    tok = mj.Tokenizer("mistral:v1")
    model = mj.Transformer(mj.ModelConfig.tiny(vocab_size=32000), rngs=nnx.Rngs(0))
    lm = MistralJaxLM(model=model, tokenizer="mistral:v1")
    shutil.copy(tok.path, tmp_path / "tokenizer.model")  # the files an HF export carries (legacy spacing)
    with open(tmp_path / "tokenizer_config.json", "w") as f:
        json.dump(dict(tokenizer_class="LlamaTokenizer", legacy=True, add_bos_token=False, add_eos_token=False,
                       bos_token="<s>", eos_token="</s>", unk_token="<unk>"), f)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for conv in CONVERSATIONS:
        messages = [(UserMessage if m["role"] == "user" else AssistantMessage)(content=m["content"]) for m in conv]
        ref = mistral.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens
        assert render_prompt(conv, tok) == ref, conv
        assert lm.tok_encode(lm.apply_chat_template(conv, add_generation_prompt=True)) == ref, conv
        hf = hf_tok.apply_chat_template(conv, chat_template=MISTRAL_V1_TEMPLATE, tokenize=True)
        assert list(hf["input_ids"] if hasattr(hf, "keys") else hf) == ref, conv


@pytest.mark.slow
def test_chat_template_matches_training_template_and_hf(env):
    from mistral_jax.data.chat import render_prompt

    lm = MistralJaxLM(model=env["model"], tokenizer=env["tok_path"])
    tok = mj.Tokenizer(env["tok_path"])
    conv = [{"role": "user", "content": "what color is the cat"}, {"role": "assistant", "content": "red"},
            {"role": "user", "content": "which dog runs"}]
    text = lm.apply_chat_template(conv, add_generation_prompt=True)
    assert text == "<s>[INST] what color is the cat [/INST] red</s>[INST] which dog runs [/INST]"
    assert lm.tok_encode(text) == render_prompt(conv, tok)  # same ids as the SFT template

    # lm-eval --apply_chat_template: the hf backend with Mistral's v1 template (checked against mistral-common above)
    import lm_eval

    cfg_path = os.path.join(env["export"], "tokenizer_config.json")
    with open(cfg_path) as f:
        tcfg = json.load(f)
    tcfg.update(legacy=True, chat_template=MISTRAL_V1_TEMPLATE)
    chat_dir = str(env["root"] / "hf_chat")
    os.makedirs(chat_dir)
    for name in os.listdir(env["export"]):
        os.symlink(os.path.join(env["export"], name), os.path.join(chat_dir, name))
    os.remove(os.path.join(chat_dir, "tokenizer_config.json"))
    with open(os.path.join(chat_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tcfg, f)
    kw = dict(tasks=["local_mc"], limit=6, task_manager=env["tm"], apply_chat_template=True)
    ours = evaluate(lm=lm, log_samples=True, verbose=False, **kw)
    ref = lm_eval.simple_evaluate(model=hf_lm(chat_dir), log_samples=True, bootstrap_iters=0,
                                  fewshot_as_multiturn=True, **kw)
    a, b = _by_doc(ours["samples"]["local_mc"]), _by_doc(ref["samples"]["local_mc"])
    assert a[0]["arguments"][0][0].startswith("<s>[INST] Question:")
    np.testing.assert_allclose([[float(r[0][0]) for r in a[d]["resps"]] for d in sorted(a)],
                               [[float(r[0][0]) for r in b[d]["resps"]] for d in sorted(b)], atol=ATOL, rtol=0)


def test_paper_table_groups_and_averages():
    suite = presets.suite("mistral_paper")
    cats = list(dict.fromkeys(b.category for b in suite))
    assert cats == ["Commonsense reasoning", "World knowledge", "Reading comprehension", "Math", "Code",
                    "Popular aggregated results"]
    assert {b.name: b.num_fewshot for b in suite if b.category == "World knowledge"} == {
        "NaturalQuestions": 5, "TriviaQA": 5}
    rng = np.random.default_rng(0)
    fake = {b.task_name: {b.metric if "," in b.metric else b.metric + "@1,create_test": float(rng.uniform())}
            for b in suite if b.task_name and b.category in ("Commonsense reasoning", "Code")}
    table, avg = presets.paper_table(fake, suite)
    cs = [v for b in suite if b.category == "Commonsense reasoning" for v in fake[b.task_name].values()]
    assert avg["Commonsense reasoning"] == pytest.approx(100 * np.mean(cs))
    assert set(avg) == {"Commonsense reasoning", "Code"} and "| World knowledge | NaturalQuestions |" in table
    with pytest.raises(ValueError, match="unknown suite"):
        presets.suite("llama")
