"""The compiled decode step (mmx.engine.decode_graph) against the eager engine: same greedy tokens and log-probs on
M1 hybrid and M2, for every kind of batch (one sequence, a few, many), under preemption, prefix sharing, n > 1,
and with reduced-precision K/V; and the eager fallback when compiling fails."""

from __future__ import annotations

import os
import shutil
import sysconfig

import pytest
import torch

import mmx.model.linear as linear_mod
from mmx.embedded import embedded_model_path
from mmx.engine import LLMEngine, SamplingParams
from mmx.engine.args import EngineArgs
from mmx.engine.decode_graph import DecodeGraph
from mmx.model.generate import greedy_generate_recompute
from mmx.model.linear import FEW_ROWS
from mmx.model.weights import load_model

from .conftest import MMX_TINY_PROMPTS, tiny_model

# inductor's CPU code is C++ built against Python's headers (make test installs both where it can)
needs_compiler = pytest.mark.skipif(
    shutil.which("g++") is None or not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")),
    reason="no C++ compiler or Python headers: torch.compile cannot build CPU code here",
)


def _traffic(vocab: int, seed: int = 7) -> list[tuple[list[int], int, int]]:
    """(prompt, max_tokens, arrival step) of FEW_ROWS + 6 requests: one alone first, then a few, then more than
    FEW_ROWS."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    late = (FEW_ROWS + 1) // 2
    arrivals = [0, 14, 14, 15, 15, 15] + [18] * late + [19] * (FEW_ROWS - late)
    for i, arrival in enumerate(arrivals):
        length = int(torch.randint(1, 40, (1,), generator=gen))
        prompt = torch.randint(0, vocab, (length,), generator=gen).tolist()
        out.append((prompt, 10 if i == 0 else 20 + i % 7, arrival))
    return out


def _run(engine: LLMEngine, traffic, params: dict) -> dict[str, tuple[list[int], list[float]]]:
    results, step, pending = {}, 0, list(range(len(traffic)))
    while pending or engine.has_unfinished_requests():
        for i in [i for i in pending if traffic[i][2] <= step]:
            prompt, max_tokens, _ = traffic[i]
            sampling = SamplingParams(
                **{"temperature": 0, "max_tokens": max_tokens, "ignore_eos": True, "logprobs": 0, **params}
            )
            engine.add_request(f"r{i}", prompt, sampling)
            pending.remove(i)
        for out in engine.step():
            if out.finished:
                for sample in out.outputs:
                    key = f"{out.request_id}/{sample.index}"
                    results[key] = (sample.token_ids, [entry.logprob for entry in sample.logprobs])
        step += 1
    return results


@pytest.fixture(autouse=True)
def _graphs_only(monkeypatch):
    """The compiled graphs are tested here; M2's steps would otherwise run natively (tests/test_native_step.py)."""
    monkeypatch.setenv("MMX_NATIVE_DECODE", "0")


# the engine settings of the equality tests (tests/test_aot_decode.py builds the same engines, to share the libraries)
SETTINGS = dict(max_model_len=160, max_num_seqs=FEW_ROWS + 4, max_num_batched_tokens=64, block_size=4)


def _engines(preset: str, compiler: str = "inductor", **kwargs) -> tuple[LLMEngine, LLMEngine]:
    """An eager and a compiled engine over two copies of the same model (the eager one re-lays its weights)."""
    settings = {**SETTINGS, **kwargs}
    eager = LLMEngine(tiny_model(preset), enforce_eager=True, **settings)
    compiled = LLMEngine(tiny_model(preset), enforce_eager=False, decode_compiler=compiler, **settings)
    return eager, compiled


def _assert_same(expected: dict, actual: dict, tolerance: float) -> None:
    assert expected.keys() == actual.keys()
    for key, (tokens, logprobs) in expected.items():
        got_tokens, got_logprobs = actual[key]
        assert got_tokens == tokens, key
        gap = max(abs(a - b) for a, b in zip(logprobs, got_logprobs))
        assert gap <= tolerance, f"{key}: log-probs differ by {gap:.2e}"


# Decode graphs are compiled only for batches past the native step's (mmx.engine.native_step); the M1 graphs ahead of
# time and the int8 experts' ahead of time cost ~50 s each to build, so they run with the slow tests.
@needs_compiler
@pytest.mark.parametrize(
    "preset, compiler",
    [
        ("tiny-m1", "inductor"),
        pytest.param("tiny-m1", "aot", marks=pytest.mark.slow),
        ("tiny-m2", "inductor"),
        ("tiny-m2", "aot"),
    ],
)
def test_compiled_decode_equals_eager(preset, compiler):
    """Staggered traffic whose decode batches hold one, a few and more than FEW_ROWS sequences, with chunked
    prefill and a cache small enough to preempt: tokens and log-probs as the eager engine's, with graphs compiled
    in the process (inductor) and ahead of time in a child process (aot)."""
    eager, compiled = _engines(preset, compiler)
    traffic = _traffic(eager.config.vocab_size)
    expected = _run(eager, traffic, {})
    actual = _run(compiled, traffic, {})
    graph = compiled.decode_graph
    assert graph is not None and graph.failed is None and graph.compiler == compiler
    assert (graph._aot is not None) == (compiler == "aot"), "the ahead-of-time graphs fell back"
    assert graph._seen == {"one", "few", "many"}, "every kind of batch was meant to run compiled"
    _assert_same(expected, actual, 2e-4)
    model = compiled.model  # and both are plain greedy generation by full recompute, an engine-free reference
    for i, (prompt, max_tokens, _) in enumerate(traffic):
        reference = greedy_generate_recompute(model, torch.tensor([prompt]), max_tokens)[0].tolist()
        assert actual[f"r{i}/0"][0] == reference, f"request {i}"


@needs_compiler
@pytest.mark.parametrize("preset", ["tiny-m1", "tiny-m2"])
def test_compiled_decode_with_shared_prefixes_and_bf16_kv(preset):
    """n = 3 samples of prompts that share a stem (their blocks shared by the prefix cache, so block tables are
    not contiguous), K/V stored in bfloat16: as eager."""
    eager, compiled = _engines(preset, kv_cache_dtype="bfloat16")
    stem = list(range(5, 30))
    traffic = [([*stem, 40 + i, 41 + i], 12, i) for i in range(4)]
    params = {"n": 3, "temperature": 0.8, "seed": 11}
    expected = _run(eager, traffic, params)
    actual = _run(compiled, traffic, params)
    assert compiled.prefix_cache.stats.hit_tokens > 0
    assert compiled.decode_graph.failed is None
    _assert_same(expected, actual, 1e-3)  # summation order, through bf16-rounded keys


@needs_compiler
@pytest.mark.slow
@pytest.mark.skipif(embedded_model_path() is None, reason="the embedded mmx-tiny model is absent")
def test_compiled_decode_int8_on_mmx_tiny():
    """int8 weights: up to FEW_ROWS sequences the compiled step widens the int8 weights to float32 as they stream
    in, where the eager kernel rounds the activations to bfloat16; larger batches run the eager int8 kernels inside
    the graph. On mmx-tiny (a trained model, so its greedy choices are not near-ties) greedy text is the eager
    engine's and log-probs differ by the activations' rounding."""
    from mmx.chat.tokenizer import Tokenizer

    path = embedded_model_path()
    tokenizer = Tokenizer.from_pretrained(path)
    prompts = MMX_TINY_PROMPTS
    settings = dict(max_model_len=160, max_num_seqs=FEW_ROWS + 4, quantization="int8")
    traffic = [(tokenizer.encode(text), 24, 0 if i == 0 else 30) for i, text in enumerate(prompts * 3)]
    eager = LLMEngine(load_model(path), enforce_eager=True, **settings)
    compiled = LLMEngine(load_model(path), enforce_eager=False, decode_compiler="inductor", **settings)
    expected, actual = _run(eager, traffic, {}), _run(compiled, traffic, {})
    assert compiled.decode_graph.failed is None and compiled.decode_graph._seen == {"one", "few", "many"}
    same = [key for key in expected if expected[key][0] == actual[key][0]]
    assert len(same) >= 21, f"greedy text differs on {len(expected) - len(same)} of {len(expected)} requests"
    _assert_same({k: expected[k] for k in same}, {k: actual[k] for k in same}, 0.05)


@needs_compiler
def test_warm_up_compiles_every_graph_before_requests(monkeypatch):
    model = tiny_model("tiny-m2")
    if torch.backends.mkldnn.is_available():
        # the eager oneDNN route's size test falls between FEW_ROWS + 1 and FEW_ROWS + 2 rows of the LM head: were it
        # evaluated while tracing, the "many" graph would be guarded on the batch size and rebuilt mid-serving
        monkeypatch.setattr(linear_mod, "ONEDNN_LINEAR", True)
        monkeypatch.setattr(linear_mod, "ONEDNN_MIN_MACS", (FEW_ROWS + 2) * model.lm_head.weight.numel())
        monkeypatch.setattr(linear_mod, "ONEDNN_MIN_WEIGHT", 0)
    engine = LLMEngine(
        model, max_model_len=64, max_num_seqs=FEW_ROWS + 2, enforce_eager=False, decode_compiler="inductor"
    )
    engine.warm_up()
    graph = engine.decode_graph
    assert graph._seen == {"one", "few", "many"} and graph.compile_seconds > 0
    spent = graph.compile_seconds
    for i in range(FEW_ROWS + 2):
        engine.add_request(f"r{i}", list(range(3, 9 + i)), SamplingParams(max_tokens=5, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    assert graph.compile_seconds == spent  # nothing compiled while serving


def test_failed_compilation_falls_back_to_eager(monkeypatch, caplog):
    model = tiny_model("tiny-m1")
    eager = LLMEngine(tiny_model("tiny-m1"), max_model_len=64, enforce_eager=True)
    engine = LLMEngine(model, max_model_len=64, enforce_eager=False, decode_compiler="inductor")

    def broken(*args):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(engine.decode_graph, "_compiled", broken)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = {}
    for name, e in (("eager", eager), ("fallback", engine)):
        e.add_request("a", [5, 6, 7, 8], params)
        while e.has_unfinished_requests():
            for out in e.step():
                if out.finished:
                    outs[name] = out.outputs[0].token_ids
    assert outs["fallback"] == outs["eager"]
    assert "no C++ compiler here" in engine.decode_graph.failed
    assert "decoding eagerly" in caplog.text


def test_enforce_eager_defaults(monkeypatch):
    monkeypatch.setenv("MMX_ENFORCE_EAGER", "0")
    assert EngineArgs().enforce_eager is False
    monkeypatch.setenv("MMX_ENFORCE_EAGER", "1")
    assert EngineArgs().enforce_eager is True
    engine = LLMEngine(tiny_model("tiny-m1"), max_model_len=32)
    assert engine.decode_graph is None  # eager: nothing to compile
    assert isinstance(LLMEngine(tiny_model("tiny-m1"), max_model_len=32, enforce_eager=False).decode_graph, DecodeGraph)


def test_inductor_cache_is_kept_per_version_of_the_traced_code(monkeypatch, tmp_path):
    from mmx.engine import decode_graph

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    decode_graph._cache_dir()
    path = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    root, digest = os.path.split(path)
    assert root == os.path.join(os.path.expanduser("~"), ".cache", "mmx", "inductor") and len(digest) == 16
    assert decode_graph._code_digest() == digest  # stable
    monkeypatch.setattr(torch, "__version__", torch.__version__ + "+other")
    assert decode_graph._code_digest() != digest
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    decode_graph._cache_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path)  # the user's choice stands


def test_dot_products_only_where_they_pay(monkeypatch):
    """Inside a compiled graph: one row always streams as dot products; up to FEW_ROWS rows only over a weight small
    enough to stay in the cache between rows; more rows never. Outside a graph, never."""
    small = torch.empty(256, 256)
    large = torch.empty(linear_mod.STREAMED_WEIGHT_MAX_BYTES // 2 + 1, 2, dtype=torch.bfloat16)  # just over
    rows = lambda n: torch.empty(n, 256)  # noqa: E731
    assert not linear_mod.streams_rows(rows(1), small)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert linear_mod.streams_rows(rows(1), small) and linear_mod.streams_rows(rows(1), large)
    assert linear_mod.streams_rows(rows(FEW_ROWS), small) and not linear_mod.streams_rows(rows(2), large)
    assert not linear_mod.streams_rows(rows(FEW_ROWS + 1), small)


@needs_compiler
@pytest.mark.parametrize("quantization", [None, "int8"])
def test_few_rows_over_large_weights_take_the_blas(monkeypatch, quantization):
    """Weights over STREAMED_WEIGHT_MAX_BYTES (all of them, here) at a few rows: the "few" graph calls the BLAS and,
    with the grouped expert kernel off (as where it cannot be built), torch's grouped GEMM (fp32) or the int8
    kernels for the experts instead of dot products, and decodes as eager."""
    import mmx.model.moe as moe_mod
    import mmx.model.quantization as quant_mod

    monkeypatch.setenv("MMX_EXPERT_ROWS", "0")
    monkeypatch.setattr(linear_mod, "STREAMED_WEIGHT_MAX_BYTES", 0)
    grouped_calls = []
    module, name = (moe_mod, "small_batch_moe") if quantization is None else (quant_mod, "int8_per_expert")
    grouped = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a: grouped_calls.append(1) or grouped(*a))
    eager, compiled = _engines("tiny-m2", max_num_seqs=4, quantization=quantization)
    traffic = [(list(range(3 + i, 12 + 2 * i)), 12, 0) for i in range(4)]
    expected = _run(eager, traffic, {})
    grouped_calls.clear()
    actual = _run(compiled, traffic, {})
    assert compiled.decode_graph.failed is None and compiled.decode_graph._seen == {"few"}
    assert len(grouped_calls) >= 11 * compiled.config.num_hidden_layers  # the experts' grouped path, every step
    _assert_same(expected, actual, 2e-4)


@needs_compiler
@pytest.mark.parametrize(
    "quantization, compiler",
    [
        (None, "inductor"),
        (None, "aot"),
        ("experts_int8", "inductor"),
        pytest.param("experts_int8", "aot", marks=pytest.mark.slow),
    ],
)
def test_decode_graphs_group_their_experts(monkeypatch, compiler, quantization):
    """2 to FEW_ROWS sequences, and one with float32 experts: the "few" (and "one") graphs run each layer's experts
    (and the few graph its dense products) in the grouped kernel (mmx.ops.expert_rows, each expert's weights read once for all its tokens; counted at
    torch's dispatcher, where both the inductor wrapper's and the AOT graph's calls pass) and decode as the eager
    engine (float32), or as the same graphs with the kernel turned off (int8 experts: the eager int8 kernel rounds
    activations to bfloat16, the graphs keep them in float32)."""
    settings = {**SETTINGS, "max_num_seqs": 4, "quantization": quantization}
    traffic = [(list(range(3 + i, 12 + 2 * i)), 12 + 8 * (i == 3), 0) for i in range(4)]  # the last runs alone
    if quantization is None:
        reference = LLMEngine(tiny_model("tiny-m2"), enforce_eager=True, **settings)
    else:
        monkeypatch.setenv("MMX_EXPERT_ROWS", "0")
        reference = LLMEngine(tiny_model("tiny-m2"), enforce_eager=False, decode_compiler=compiler, **settings)
    expected = _run(reference, traffic, {})
    monkeypatch.delenv("MMX_EXPERT_ROWS", raising=False)
    compiled = LLMEngine(tiny_model("tiny-m2"), enforce_eager=False, decode_compiler=compiler, **settings)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        actual = _run(compiled, traffic, {})
    counts = {event.key: event.count for event in profile.key_averages()}
    assert compiled.decode_graph.failed is None and compiled.decode_graph._seen == {"one", "few"}
    steps = 11 if quantization else 19  # every step of 4 to 2 sequences, and of one with float32 experts
    assert counts.get("mmx::expert_rows", 0) >= steps * compiled.config.num_hidden_layers
    # the dense products of 2-4 sequences too: q, k, v and o in every layer (mmx::dense_rows)
    assert counts.get("mmx::dense_rows", 0) >= 11 * 4 * compiled.config.num_hidden_layers
    _assert_same(expected, actual, 2e-4)
