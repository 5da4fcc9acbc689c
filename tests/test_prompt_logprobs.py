"""Prompt log-probabilities: computed by the engine from the prefill's own forward (chunked prefill included, never a
second pass) and returned by /v1/completions with echo + logprobs the way lm-eval's local-completions reads them
for loglikelihood requests. The reference is mmx-tiny scored directly: one dense forward of ``mmx.load_model``,
log-softmax at the continuation positions."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from mmx import LLM, SamplingParams, load_model
from mmx.chat.tokenizer import Tokenizer
from mmx.embedded import embedded_model_path

from .helpers import serve

# The servers and engines here feed at most this many tokens per forward: longer prompts are prefilled in chunks.
CHUNK = 16
MODEL = "mmx-tiny"
STORY = "Tom has 57 marbles. Tom loses 19. Tom buys 4 packs with 6 marbles in each. How many marbles does Tom have now?"
# (context, continuation) pairs as a loglikelihood task has them; the later ones span several prefill chunks
ITEMS = [
    ("Ana has 12 apples. Ana buys 30 more. How many apples does Ana have now? Answer:", " 42"),
    ("The quick brown fox", " jumps over the lazy dog."),
    (STORY + " Answer:", " 62"),
    (STORY + " " + STORY + " Answer:", " 62 marbles"),
]


@pytest.fixture(scope="module")
def path() -> str:
    found = embedded_model_path()
    if found is None:
        pytest.skip("the embedded mmx-tiny model is not installed")
    return found


@pytest.fixture(scope="module")
def model(path):
    return load_model(path)


@pytest.fixture(scope="module")
def tokenizer(path) -> Tokenizer:
    return Tokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def server(path):
    with serve(path, "--max-num-batched-tokens", str(CHUNK), max_model_len=2048, cache_gb=0.1) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0)


def dense_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] log-softmax of one dense forward: row i is the distribution of token i + 1."""
    with torch.no_grad():
        return model(torch.tensor([ids])).log_softmax(-1)[0]


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a (context, continuation) pair into token ids."""
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids) :]


def score_directly(model, context_ids: list[int], continuation_ids: list[int]) -> tuple[float, bool]:
    """(sum of the continuation's log-probs, whether every continuation token is the argmax)."""
    ids = context_ids + continuation_ids
    logp = dense_logprobs(model, ids)[len(context_ids) - 1 : -1]
    target = torch.tensor(continuation_ids)
    return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


# ---------------------------------------------------------------------------------------------------- engine
@pytest.mark.parametrize("chunk", [2048, CHUNK, 5])
def test_engine_prompt_logprobs_equal_a_dense_forward(model, chunk):
    ids = list(range(3, 3 + 50))
    llm = LLM(model, max_num_batched_tokens=chunk, cache_memory_gb=0.05, max_model_len=512)
    out = llm.generate([ids], SamplingParams(max_tokens=0, n=2, prompt_logprobs=3), use_tqdm=False)[0]
    ref = dense_logprobs(model, ids)
    entries = out.prompt_logprobs
    assert entries[0] is None and len(entries) == len(ids)
    for i, entry in enumerate(entries[1:], 1):
        row, target = ref[i - 1], ids[i]
        assert entry.token_id == target
        assert abs(entry.logprob - row[target].item()) < 1e-4
        # the rank counts the tokens more likely than the prompt's (bounds allow for near-ties)
        assert 1 + int((row > row[target] + 1e-4).sum()) <= entry.rank <= 1 + int((row > row[target] - 1e-4).sum())
        top = row.topk(3)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert [lp for _, lp in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)
    # max_tokens 0: the prompt is prefilled and scored, nothing is generated
    assert [(s.token_ids, s.finish_reason) for s in out.outputs] == [([], "length")] * 2


def test_one_forward_per_step_and_the_same_tokens(model):
    """Scoring the prompt rides on the prefill: no extra forward, no change to what is generated. With a budget of
    2 tokens per step and a decoding neighbour, the long prompt is fed one token per step (steps the scheduler files
    as decode steps), which must be scored too."""
    calls = []
    hook = model.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        runs = {}
        for k in (None, 2):
            llm = LLM(model, max_num_batched_tokens=2, cache_memory_gb=0.05, max_model_len=512)
            neighbour = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
            scored = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=k)
            calls.clear()
            outs = llm.generate([[5, 6], list(range(10, 40))], [neighbour, scored], use_tqdm=False)
            runs[k] = (len(calls), [o.outputs[0].token_ids for o in outs], outs[1].prompt_logprobs)
    finally:
        hook.remove()
    (plain_calls, plain_tokens, none), (calls_with, tokens_with, entries) = runs[None], runs[2]
    assert none is None and (calls_with, tokens_with) == (plain_calls, plain_tokens)
    ids = list(range(10, 40))
    ref = dense_logprobs(model, ids)
    got = torch.tensor([e.logprob for e in entries[1:]])
    assert torch.allclose(got, ref[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0], atol=1e-4)


def test_sampling_params_checks():
    assert SamplingParams(max_tokens=0).max_tokens == 0
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=-1)


# ---------------------------------------------------------------------------------------------------- the server
@pytest.mark.parametrize("max_tokens", [1, 0])
def test_loglikelihood_requests_equal_direct_scoring(server, model, tokenizer, max_tokens):
    """The request lm-eval's local-completions sends for a batch of loglikelihood requests, parsed as it parses
    it (token_logprobs[ctxlen:-1] with max_tokens 1, which drops the generated token)."""
    pairs = [encode_pair(tokenizer, c, x) for c, x in ITEMS]
    assert max(len(c) + len(x) for c, x in pairs) > 3 * CHUNK  # several prefill chunks
    body = {
        "model": MODEL,
        "prompt": [c + x for c, x in pairs],
        "temperature": 0,
        "max_tokens": max_tokens,
        "logprobs": 1,
        "seed": 1234,
        "echo": True,
    }
    reply = httpx.post(f"{server}/v1/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    choices = sorted(reply.json()["choices"], key=lambda c: c["index"])
    assert len(choices) == len(pairs)
    for choice, (context, continuation) in zip(choices, pairs):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(context) + len(continuation) + max_tokens
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        end = len(lp["token_logprobs"]) - max_tokens
        got = sum(lp["token_logprobs"][len(context) : end])
        greedy = all(
            t == max(top.values())
            for t, top in zip(lp["token_logprobs"][len(context) : end], lp["top_logprobs"][len(context) : end])
        )
        expected, expected_greedy = score_directly(model, context, continuation)
        assert got == pytest.approx(expected, abs=1e-4)
        assert greedy == expected_greedy
        if max_tokens == 0:
            assert choice["finish_reason"] == "length"


def test_echo_returns_the_prompt_with_its_logprobs_and_offsets(client):
    prompt = "The quick brown fox"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, echo=True, logprobs=2)
    choice = out.choices[0]
    lp = choice.logprobs
    n_prompt = out.usage.prompt_tokens
    assert choice.text.startswith(prompt) and len(lp.tokens) == n_prompt + out.usage.completion_tokens
    assert "".join(lp.tokens[:n_prompt]) == prompt and "".join(lp.tokens) == choice.text
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for token, logprob, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        # the 2 best tokens and the chosen one (OpenAI: up to logprobs + 1)
        assert top[token] == logprob and 2 <= len(top) <= 3 and logprob <= max(top.values())
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=2).choices[0]
    assert prompt + plain.text == choice.text and plain.logprobs.tokens == lp.tokens[n_prompt:]


def test_max_tokens_zero(server, client):
    only = client.completions.create(model=MODEL, prompt="Ana has", max_tokens=0, echo=True, logprobs=0)
    assert only.choices[0].text == "Ana has" and only.choices[0].finish_reason == "length"
    assert only.usage.completion_tokens == 0 and len(only.choices[0].logprobs.tokens) == only.usage.prompt_tokens
    # without echo there is nothing to return: refused, as vLLM does
    reply = httpx.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": "Ana has", "max_tokens": 0})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "max_tokens"


def test_vllm_prompt_logprobs_field(server, model, tokenizer):
    prompt = "Ana has 12 apples. Ana buys 30 more."
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 2}
    reply = httpx.post(f"{server}/v1/completions", json=body, timeout=30).json()
    ids = tokenizer.encode(prompt)
    ref = dense_logprobs(model, ids)
    entries = reply["choices"][0]["prompt_logprobs"]  # vLLM: in each choice of a completion
    assert entries[0] is None and len(entries) == len(ids)
    for i, entry in enumerate(entries[1:], 1):
        own = entry[str(ids[i])]
        assert own["logprob"] == pytest.approx(ref[i - 1, ids[i]].item(), abs=1e-4)
        assert own["decoded_token"] == tokenizer.decode([ids[i]])
        best = ref[i - 1].topk(2).indices.tolist()
        assert {entry[str(t)]["rank"] for t in best} == {1, 2} and set(entry) <= {str(ids[i]), *map(str, best)}
    assert reply["choices"][0]["logprobs"] is None  # prompt_logprobs alone asks for nothing else

    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "prompt_logprobs": 0}
    reply = httpx.post(f"{server}/v1/chat/completions", json=chat, timeout=30).json()
    entries = reply["prompt_logprobs"]  # vLLM: top-level for chat
    assert entries[0] is None and len(entries) == reply["usage"]["prompt_tokens"]
    assert all(len(e) == 1 and next(iter(e.values()))["logprob"] <= 0 for e in entries[1:])
    for route, payload in (("completions", body), ("chat/completions", chat)):
        refused = httpx.post(f"{server}/v1/{route}", json={**payload, "stream": True})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "prompt_logprobs"


def _stop_inside(text: str) -> str:
    """A stop string that first occurs in the middle of ``text``."""
    for start in range(len(text) // 3, len(text) - 4):
        candidate = text[start : start + 4]
        if text.find(candidate) == start and candidate.strip():
            return candidate
    raise AssertionError(f"no usable stop string in {text!r}")


def test_streamed_logprobs_travel_with_their_text(client):
    """Streamed with echo, a stop string and logprobs: the chunks add up to the non-streamed choice, and each log-prob
    arrives in the chunk that completes its token's text (not ahead of it in an empty chunk while the text is held
    back as a possible stop string, nor later than that)."""
    prompt = "Ana has 12 apples. Ana buys 30 more."
    free = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, logprobs=0).choices[0]
    stop = _stop_inside(free.text)
    # never matches, but holds back the first token's text until the second token shows it is no stop string
    hold = free.logprobs.tokens[0][-1] + "\u2400"
    free = free.text
    kwargs = {"model": MODEL, "prompt": prompt, "max_tokens": 40, "temperature": 0, "stop": [stop, hold], "logprobs": 1}
    whole = client.completions.create(**kwargs, echo=True).choices[0]
    assert whole.text == prompt + free[: free.find(stop)] and whole.finish_reason == "stop"
    expected = whole.logprobs
    text, got, finish = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}, None
    held_back = False  # some text was held back, then sent with the tokens it came from
    for chunk in client.completions.create(**kwargs, echo=True, stream=True):
        choice = chunk.choices[0]
        text += choice.text
        if choice.logprobs:
            assert choice.text, "log-probs in a chunk without text"
            held_back |= bool(text != prompt and len(choice.logprobs.tokens) > 1 and not choice.finish_reason)
            for key in got:
                got[key] += getattr(choice.logprobs, key)
        finish = choice.finish_reason or finish
        if choice.finish_reason is None:
            sent = "".join(got["tokens"])
            assert text.startswith(sent), "a log-prob arrived before its token's text"
            following = expected.tokens[len(got["tokens"]) :][:1]
            assert len(sent + "".join(following)) > len(text), "a token's text was sent without its log-prob"
    assert (text, finish) == (whole.text, whole.finish_reason) and held_back
    assert got == {key: getattr(expected, key) for key in got}
