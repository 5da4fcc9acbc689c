"""The smaller routes, against a real `mmx serve` of mmx-tiny through the SDKs and plain HTTP:
``/v1/messages/count_tokens``, ``/v1/models/{id}``, ``/tokenize`` (prompt or messages), ``/detokenize``,
``/tokenizer_info`` (what lm-eval's remote tokenizer reads), ``/health``, the API key in front of the tokenizer
routes, a 5 MB ``/tokenize`` that leaves ``/health`` fast, and the OpenAPI document's error statuses."""

from __future__ import annotations

import json
import random
import statistics
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

from mmx.tasks.arithmetic import CALCULATOR_TOOL, SYSTEM_PROMPT  # noqa: E402

from .helpers import serve  # noqa: E402

MODEL = "mmx-tiny"
KEY = "sk-endpoints-test"
CONVERSATION = [
    {"role": "system", "content": SYSTEM_PROMPT},
    {"role": "user", "content": "Sara has 40 coins. Sara finds 25 more. How many coins does Sara have now?"},
]


@pytest.fixture(scope="module")
def local_tokenizer():
    """The served model's tokenizer, loaded here: the reference for what the server tokenises."""
    from mmx.chat.tokenizer import Tokenizer
    from mmx.embedded import embedded_model_path

    path = embedded_model_path()
    if path is None:
        pytest.skip("the embedded mmx-tiny model is not installed")
    return Tokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def keyed_server():
    """mmx-tiny behind an API key, with a body limit that lets a 5 MB /tokenize in."""
    from mmx.embedded import embedded_model_path

    path = embedded_model_path()
    if path is None:
        pytest.skip("the embedded mmx-tiny model is not installed")
    with serve(path, "--api-key", KEY, "--max-body-mb", "8", max_model_len=2048, cache_gb=0.1) as url:
        yield url


# ---------------------------------------------------------------------------------------------------- count_tokens
@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"tools": [{"name": "calculator", "input_schema": CALCULATOR_TOOL["function"]["parameters"]}]},
        {"thinking": {"type": "disabled"}},
        {"tool_choice": {"type": "any"}, "tools": [{"name": "calculator", "input_schema": {"type": "object"}}]},
        {"messages": [*CONVERSATION[1:], {"role": "assistant", "content": "Sara has"}]},  # a prefill
    ],
    ids=["plain", "tools", "thinking-off", "forced-call", "prefill"],
)
def test_count_tokens_equals_the_input_tokens_of_the_same_request(tiny_server, fields):
    client = anthropic.Anthropic(base_url=tiny_server, api_key="unused", max_retries=0)
    request = {"model": MODEL, "system": SYSTEM_PROMPT, "messages": CONVERSATION[1:], **fields}
    counted = client.messages.count_tokens(**request)
    sent = client.messages.create(**request, max_tokens=2)
    usage = sent.usage  # as in Anthropic's API, input_tokens leave out the tokens read from the prefix cache
    assert counted.input_tokens == usage.input_tokens + usage.cache_read_input_tokens > 20


def test_count_tokens_errors_are_anthropic_shaped(tiny_server):
    client = anthropic.Anthropic(base_url=tiny_server, api_key="unused", max_retries=0)
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="claude-9", messages=CONVERSATION[1:])
    r = httpx.post(f"{tiny_server}/v1/messages/count_tokens", json={"model": MODEL, "messages": []})
    assert r.status_code == 400 and r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(
        f"{tiny_server}/v1/messages/count_tokens", json={"model": MODEL, "messages": CONVERSATION[1:], "stream": True}
    )
    assert r.status_code == 400 and "stream" in r.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------------- models
def test_retrieve_a_model_by_id(tiny_server):
    client = openai.OpenAI(base_url=f"{tiny_server}/v1", api_key="unused", max_retries=0)
    model = client.models.retrieve(MODEL)
    assert (
        model.id == MODEL
        and model.object == "model"
        and model.model_dump() == client.models.list().data[0].model_dump()
    )
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-9")
    assert e.value.body["type"] == "not_found_error" and "gpt-9" in e.value.body["message"]


# ---------------------------------------------------------------------------------------------------- tokenizer
def test_tokenize_and_detokenize_round_trip(tiny_server, local_tokenizer):
    text = "Sara has 40 coins.\nnaïve café — 東京 🙂 <think> ]~b]user"
    r = httpx.post(f"{tiny_server}/tokenize", json={"prompt": text, "return_token_strs": True})
    body = r.json()
    assert r.status_code == 200 and body["tokens"] == local_tokenizer.encode(text)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 2048
    assert body["token_strs"] == [local_tokenizer.id_to_token(i) for i in body["tokens"]]
    back = httpx.post(f"{tiny_server}/detokenize", json={"tokens": body["tokens"]}).json()
    assert back == {"prompt": text}
    r = httpx.post(f"{tiny_server}/detokenize", json={"tokens": [1, local_tokenizer.vocab_size]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens.1"
    r = httpx.post(f"{tiny_server}/tokenize", json={"prompt": "x", "model": "gpt-9"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_tokenize_messages_renders_as_chat_completions_does(tiny_server):
    client = openai.OpenAI(base_url=f"{tiny_server}/v1", api_key="unused", max_retries=0)
    for extra in ({}, {"tools": [CALCULATOR_TOOL]}):
        chat = client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=1, **extra)
        counted = httpx.post(f"{tiny_server}/tokenize", json={"messages": CONVERSATION, **extra}).json()
        assert counted["count"] == chat.usage.prompt_tokens == len(counted["tokens"])
    with_prompt = httpx.post(f"{tiny_server}/tokenize", json={"messages": CONVERSATION}).json()["tokens"]
    without = httpx.post(
        f"{tiny_server}/tokenize", json={"messages": CONVERSATION, "add_generation_prompt": False}
    ).json()["tokens"]
    assert len(without) < len(with_prompt) and with_prompt[: len(without)] == without
    continued = httpx.post(
        f"{tiny_server}/tokenize",
        json={
            "messages": [*CONVERSATION, {"role": "assistant", "content": "Sara has"}],
            "add_generation_prompt": False,
            "continue_final_message": True,
        },
    ).json()["tokens"]
    detok = httpx.post(f"{tiny_server}/detokenize", json={"tokens": continued}).json()["prompt"]
    assert detok.endswith("Sara has")
    r = httpx.post(f"{tiny_server}/tokenize", json={"messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.role"


def test_tokenizer_info_is_what_lm_evals_remote_tokenizer_reads(tiny_server, local_tokenizer):
    from mmx.chat.template import render_chat

    info = httpx.get(f"{tiny_server}/tokenizer_info").json()
    assert info["eos_token"] == local_tokenizer.eos_token == "[e~["
    assert info["model_max_length"] == 2048 and info["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert info["vocab_size"] == local_tokenizer.vocab_size and "bos_token" in info and "pad_token" in info
    # lm-eval takes eos_token_id as the first token of /tokenize(eos_token), without special tokens
    eos = httpx.post(f"{tiny_server}/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False})
    assert eos.json()["tokens"] == [local_tokenizer.eos_token_id]
    # and renders chats itself with the template: the one the server renders with
    text = render_chat(info["chat_template"], CONVERSATION, add_generation_prompt=True, eos_token=info["eos_token"])
    served = httpx.post(f"{tiny_server}/tokenize", json={"messages": CONVERSATION}).json()["tokens"]
    assert local_tokenizer.encode(text) == served


def test_health_is_a_small_json_body(tiny_server):
    r = httpx.get(f"{tiny_server}/health")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json" and r.json() == {"status": "ok"}


# ---------------------------------------------------------------------------------------------------- pieces
def _texts(seed: int, n_chars: int) -> str:
    """Random text of words, numbers, unicode, special-token strings and every kind of whitespace run."""
    rng = random.Random(seed)
    words = [
        "Sara",
        "has",
        "coins",
        "naïve",
        "café",
        "東京",
        "🙂",
        "x1",
        "42",
        "3.14",
        "don't",
        "<think>",
        "]~b]",
        "[e~[",
    ]
    seps = [" ", " ", " ", "\n", "  ", "\n\n", "\t", ", ", ". ", " \n", "\n ", "!\n", ""]
    parts, size = [], 0
    while size < n_chars:
        parts.append(rng.choice(words) + rng.choice(seps))
        size += len(parts[-1])
    return "".join(parts)


def test_long_text_is_encoded_in_pieces_that_give_the_texts_tokens(local_tokenizer, tiny_tokenizer):
    """Both of mmx's byte-level BPEs: mmx-tiny's (digits split) and the test suite's (digits merged)."""
    from mmx.serve.tokenizer_api import pieces, tokenize_body

    for tokenizer in (local_tokenizer, tiny_tokenizer):
        for seed in range(4):
            text = _texts(seed, 30_000)
            cut = pieces(tokenizer, text, size=700)
            assert len(cut) > 20 and "".join(cut) == text
            assert [t for piece in cut for t in tokenizer.encode(piece)] == tokenizer.encode(text)
        text = _texts(9, 200_000)  # longer than one piece at the default size
        body = json.loads(tokenize_body(tokenizer, text, True, True, 2048))
        assert body["tokens"] == tokenizer.encode(text) and body["count"] == len(body["tokens"])
        assert body["token_strs"] == [tokenizer.id_to_token(i) for i in body["tokens"]]
    # a line of one character repeated has no place to cut: one piece, still the right tokens
    assert pieces(local_tokenizer, "a" * 5000, size=700) == ["a" * 5000]


def _fresh_backend(tokenizer):
    from tokenizers import Tokenizer as Backend

    return Backend.from_str(tokenizer.backend.to_str())


def test_special_tokens_of_a_post_processor_are_added_once(local_tokenizer):
    from tokenizers import processors

    from mmx.chat.tokenizer import Tokenizer
    from mmx.serve.tokenizer_api import pieces, tokenize_body

    backend = _fresh_backend(local_tokenizer)
    bos, eos = "]~!b[", "[e~["
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, backend.token_to_id(bos)), (eos, backend.token_to_id(eos))]
    )
    tokenizer = Tokenizer(backend, {})
    text = _texts(3, 200_000)
    assert len(pieces(tokenizer, text)) > 1
    body = json.loads(tokenize_body(tokenizer, text, True, False, 2048))
    assert body["tokens"] == backend.encode(text, add_special_tokens=True).ids
    assert body["tokens"][0] == backend.token_to_id(bos) and body["tokens"][-1] == backend.token_to_id(eos)
    assert json.loads(tokenize_body(tokenizer, text, False, False, 2048))["tokens"] == tokenizer.encode(text)


def test_a_tokenizer_with_a_normaliser_is_never_cut(local_tokenizer):
    from tokenizers import normalizers

    from mmx.chat.tokenizer import Tokenizer
    from mmx.serve.tokenizer_api import pieces

    backend = _fresh_backend(local_tokenizer)
    backend.normalizer = normalizers.NFKC()
    text = _texts(1, 5000)
    assert pieces(Tokenizer(backend, {}), text, size=700) == [text]


def test_a_prompt_over_the_limit_is_413_and_nothing_is_encoded(local_tokenizer):
    from starlette.testclient import TestClient

    from mmx.chat.formats import chat_for
    from mmx.serve import ServerState, build_app

    class NoEngine:
        alive = True

    state = ServerState(NoEngine(), local_tokenizer, chat_for(local_tokenizer, "minimax_m2"), MODEL, "x", 2048)
    state.max_tokenize_chars = 1000
    with TestClient(build_app(state)) as client:
        r = client.post("/tokenize", json={"prompt": "x" * 1001})
        assert (
            r.status_code == 413 and r.json()["error"]["param"] == "prompt" and "1000" in r.json()["error"]["message"]
        )
        r = client.post("/tokenize", json={"prompt": "x" * 1000})
        assert r.status_code == 200 and r.json()["count"] > 0
        lone_surrogate = b'{"prompt": "bad \\ud800 surrogate"}'  # valid JSON, not valid Unicode
        r = client.post("/tokenize", content=lone_surrogate, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------------- the API key
def test_tokenizer_routes_are_behind_the_api_key(keyed_server):
    url = keyed_server
    calls = [
        ("post", "/tokenize", {"prompt": "hi"}),
        ("post", "/detokenize", {"tokens": [1, 2]}),
        ("get", "/tokenizer_info", None),
        ("get", f"/v1/models/{MODEL}", None),
        ("post", "/v1/responses", {"model": MODEL, "input": "hi", "max_output_tokens": 2}),
    ]
    for method, path, body in calls:
        r = httpx.request(method, f"{url}{path}", json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
        for auth in ({"authorization": f"Bearer {KEY}"}, {"x-api-key": KEY}):
            assert httpx.request(method, f"{url}{path}", json=body, headers=auth).status_code == 200, path
    r = httpx.post(f"{url}/v1/messages/count_tokens", json={"model": MODEL, "messages": CONVERSATION[1:]})
    assert r.status_code == 401 and r.json()["type"] == "error"
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}  # probes stay open
    assert httpx.get(f"{url}/openapi.json").status_code == 200


def test_a_5_mb_tokenize_keeps_health_fast(keyed_server, local_tokenizer):
    """Issue 12: tokenisation off the event loop. The body is encoded and the answer parsed outside the probing
    window, so the probes measure the server, not this process's own GIL."""
    url = keyed_server
    line = "Sara has 40 coins and finds 25 more, then buys 3 bags of 6 (naïve café, 東京).\n"
    text = (line * (5_000_000 // len(line) + 1))[:5_000_000]
    payload = json.dumps({"prompt": text}).encode()
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    answer = {}

    def post():
        with httpx.Client(timeout=300) as c:
            answer["r"] = c.post(f"{url}/tokenize", content=payload, headers=headers)

    latencies = []
    with httpx.Client(timeout=10) as probe:
        probe.get(f"{url}/health")
        worker = threading.Thread(target=post)
        began = time.perf_counter()
        worker.start()
        while worker.is_alive():
            start = time.perf_counter()
            assert probe.get(f"{url}/health").status_code == 200
            latencies.append(time.perf_counter() - start)
            time.sleep(0.02)
    worker.join()
    elapsed = time.perf_counter() - began
    r = answer["r"]
    assert r.status_code == 200, r.text[:300]
    body = r.json()
    assert body["count"] == len(body["tokens"]) > 1_000_000
    assert local_tokenizer.decode(body["tokens"], skip_special_tokens=False) == text
    assert len(latencies) > 20, "the tokenize finished before /health was probed much"
    # A blocked event loop would hold /health for the whole tokenisation (seconds, and then few probes at all); a
    # busy machine adds a spike (1.14 s seen once, in a slow minute): half the run, or 1 s, bounds it.
    spike = max(1.0, elapsed / 2)
    assert max(latencies) < spike, f"/health took {max(latencies):.3f} s while a 5 MB /tokenize ran ({elapsed:.1f} s)"
    assert statistics.median(latencies) < 0.1, f"/health took {statistics.median(latencies):.3f} s (median)"


# ---------------------------------------------------------------------------------------------------- OpenAPI
def test_openapi_documents_the_errors_and_streams_the_server_sends(tiny_server, keyed_server):
    doc = httpx.get(f"{tiny_server}/openapi.json").json()
    operations = {(path, method): op for path, ops in doc["paths"].items() for method, op in ops.items()}
    assert ("/v1/responses", "post") in operations and ("/v1/models/{model_id}", "get") in operations
    for (path, method), op in operations.items():
        responses = op["responses"]
        assert "422" not in responses, path
        error = "AnthropicError" if path.startswith("/v1/messages") else "OpenAIError"
        expected = {"400", "413"} if method == "post" else set()
        assert expected <= set(responses), (path, sorted(responses))
        for status in set(responses) - {"200", "503"}:
            assert responses[status]["content"]["application/json"]["schema"]["$ref"].endswith(error), (path, status)
        assert "401" not in responses  # this server has no API key
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/responses"):
        assert "text/event-stream" in operations[(path, "post")]["responses"]["200"]["content"]
    health = operations[("/health", "get")]["responses"]["200"]["content"]["application/json"]["schema"]
    assert health["$ref"].endswith("/Health") and doc["components"]["schemas"]["Health"]["required"] == ["status"]
    # and the server does what the document says: a validation error is a 400 with the documented body
    r = httpx.post(f"{tiny_server}/v1/responses", json={"model": MODEL})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}

    keyed = httpx.get(f"{keyed_server}/openapi.json").json()
    assert set(keyed["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert "401" in keyed["paths"]["/tokenize"]["post"]["responses"]
    assert (
        keyed["paths"]["/health"]["get"]["security"] == []
        and "401" not in keyed["paths"]["/health"]["get"]["responses"]
    )
