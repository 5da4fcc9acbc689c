"""lm-evaluation-harness against a real `mmx serve` of mmx-tiny on 127.0.0.1: a loglikelihood (multiple-choice) task
and a generate_until task, defined from local JSONL files in a task directory, run end to end under `lm_eval` with
its local-completions model. Every per-item result and every score equals what mmx-tiny gives directly
(``mmx.load_model`` for log-likelihoods, ``mmx.LLM`` greedy generation for the generated answers).

The prompts are arithmetic problems in mmx-tiny's chat format (rendered into plain completions prompts), which it
solves often but not always, so the scores are neither 0 nor 1."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow
for _module in ("lm_eval", "tenacity"):  # tenacity: what lm-eval's API models need (its "api" extra)
    pytest.importorskip(_module, reason="lm-eval[api] is not installed (pip install -e '.[eval]')")

from mmx import LLM, SamplingParams, load_model  # noqa: E402
from mmx.chat.tokenizer import Tokenizer  # noqa: E402

MODEL = "mmx-tiny"
# (problem, its answer): mmx-tiny gets the first three right and the last two wrong
PROBLEMS = [
    ("Ana has 12 apples. Ana buys 30 more. How many apples does Ana have now?", 42),
    ("Tom has 57 marbles. Tom loses 19. How many marbles does Tom have now?", 38),
    ("Mia has 20 cards. Mia gives away 6. How many cards does Mia have now?", 14),
    ("Sam has 8 pens. Sam buys 5 more. How many pens does Sam have now?", 13),
    ("Leo has 3 boxes with 4 balls in each. How many balls does Leo have?", 12),
]
ANSWER = r"So the answer is (\d+)"
UNTIL = ["</think>"]
MAX_GEN_TOKS = 64

CHOICE_TASK = """\
task: mmx_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""
GENERATE_TASK = """\
task: mmx_tiny_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: {until}
  max_gen_toks: {max_gen_toks}
  do_sample: false
  temperature: 0
filter_list:
  - name: answer
    filter:
      - function: regex
        regex_pattern: {pattern}
      - function: take_first
metric_list:
  - metric: exact_match
"""


def _prompt(tokenizer: Tokenizer, problem: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": problem}], add_generation_prompt=True)


def _documents(tokenizer: Tokenizer) -> tuple[list[dict], list[dict]]:
    """(multiple-choice docs, generation docs). A choice is a whole worked answer, scored after the prompt (many
    tokens, so the log-likelihood sums over several prefill chunks' positions)."""
    choice_docs, generate_docs = [], []
    for problem, answer in PROBLEMS[:3]:
        name, first = problem.split()[0], int(re.findall(r"\d+", problem)[0])
        op = "+" if answer > first else "-"
        worked = [
            f"{name} starts with {first}.\n{first} {op} {abs(answer - first)} = {n}.\nSo the answer is {n}."
            for n in (answer + 1, answer, answer - 1)
        ]
        choice_docs.append({"context": _prompt(tokenizer, problem), "choices": worked, "answer": 1})
    for problem, answer in PROBLEMS:
        generate_docs.append({"context": _prompt(tokenizer, problem), "answer": str(answer)})
    return choice_docs, generate_docs


def _write_tasks(directory, choice_docs: list[dict], generate_docs: list[dict]) -> None:
    settings = {"until": json.dumps(UNTIL), "max_gen_toks": MAX_GEN_TOKS, "pattern": json.dumps(ANSWER)}
    for name, docs, template in (("choice", choice_docs, CHOICE_TASK), ("generate", generate_docs, GENERATE_TASK)):
        data = directory / f"{name}.jsonl"
        data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
        (directory / f"{name}.yaml").write_text(template.format(data=data, **settings))


def _samples(output, task: str) -> list[dict]:
    (path,) = glob.glob(str(output / "**" / f"samples_{task}_*.jsonl"), recursive=True)
    with open(path) as f:
        return sorted((json.loads(line) for line in f), key=lambda s: s["doc_id"])


def _direct_loglikelihood(model, tokenizer: Tokenizer, context: str, continuation: str) -> float:
    """The continuation's log-likelihood from one dense forward, its tokens split from the context as lm-eval does
    (trailing whitespace of the context moves to the continuation; the pair is encoded whole, then cut)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = tokenizer.encode(context)
    ids = tokenizer.encode(context + continuation)
    with torch.no_grad():
        logp = model(torch.tensor([ids])).log_softmax(-1)[0]
    return sum(logp[i - 1, ids[i]].item() for i in range(len(context_ids), len(ids)))


def test_lm_eval_local_completions_scores_equal_direct_scoring(tmp_path, tiny_server):
    from mmx.embedded import embedded_model_path

    path = embedded_model_path()
    tokenizer = Tokenizer.from_pretrained(path)
    choice_docs, generate_docs = _documents(tokenizer)
    tasks, output = tmp_path / "tasks", tmp_path / "out"
    tasks.mkdir()
    _write_tasks(tasks, choice_docs, generate_docs)
    model_args = (
        f"base_url={tiny_server}/v1/completions,model={MODEL},tokenizer_backend=huggingface,tokenizer={path},"
        "tokenized_requests=True,num_concurrent=1,max_retries=1"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", model_args]
    command += ["--tasks", "mmx_tiny_choice,mmx_tiny_generate", "--include_path", str(tasks)]
    command += ["--output_path", str(output), "--log_samples", "--batch_size", "2"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
    (results_file,) = glob.glob(str(output / "**" / "results_*.json"), recursive=True)
    with open(results_file) as f:
        results = json.load(f)["results"]

    model = load_model(path)
    correct = []
    for sample, doc in zip(_samples(output, "mmx_tiny_choice"), choice_docs, strict=True):
        arguments = [(a["arg_0"], a["arg_1"]) for a in sample["arguments"].values()]
        assert [c for _, c in arguments] == doc["choices"]
        got = [float(resp[0]) for resp in sample["filtered_resps"]]
        expected = [_direct_loglikelihood(model, tokenizer, ctx, cont) for ctx, cont in arguments]
        assert got == pytest.approx(expected, abs=1e-4)
        correct.append(max(range(len(expected)), key=expected.__getitem__) == doc["answer"])
    assert results["mmx_tiny_choice"]["acc,none"] == pytest.approx(sum(correct) / len(correct))

    llm = LLM(path)
    params = SamplingParams(temperature=0, max_tokens=MAX_GEN_TOKS, stop=UNTIL)
    texts = [o.text for o in llm.generate([d["context"] for d in generate_docs], params, use_tqdm=False)]
    samples = _samples(output, "mmx_tiny_generate")
    assert [s["resps"][0][0] for s in samples] == texts
    answers = [m.group(1) if (m := re.search(ANSWER, t)) else "[invalid]" for t in texts]
    assert [s["filtered_resps"][0] for s in samples] == answers
    score = sum(a == d["answer"] for a, d in zip(answers, generate_docs)) / len(answers)
    assert 0 < score < 1 and results["mmx_tiny_generate"]["exact_match,answer"] == pytest.approx(score)
