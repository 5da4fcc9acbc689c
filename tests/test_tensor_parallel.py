"""Tensor and expert parallelism (mmx.parallel): 2 gloo processes against one process.

A sharded model must compute what the whole model computes: the same greedy tokens and per-token log-probs within
1e-4 (fp32), through mmx.LLM (its workers spawned by mmx) and through `mmx serve`; each rank loads only its slices.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from mmx import LLM, MiniMaxConfig, MiniMaxForCausalLM, SamplingParams
from mmx.parallel.group import ParallelGroup
from mmx.parallel.loading import load_shard
from mmx.parallel.sharding import plan_cuts, shard_model
from tests.conftest import tiny_model
from tests.test_checkpoints import _fp8_checkpoint

# (preset, overrides): the hybrid with 3 heads per rank (6 heads, 2 KV heads: one per rank), M2 with QK-norm and
# partial RoPE, its single KV head replicated on both ranks
MODELS = {
    "hybrid": ("tiny-m1", {"num_attention_heads": 6, "num_key_value_heads": 2}),
    "m2": ("tiny-m2", {"num_key_value_heads": 1}),
}
PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [20, 30, 40] * 7, list(range(100, 160)), [7] * 40]


@pytest.fixture(scope="module", params=sorted(MODELS))
def checkpoint(request, tmp_path_factory) -> str:
    preset, overrides = MODELS[request.param]
    path = str(tmp_path_factory.mktemp(request.param))
    tiny_model(preset, **overrides).save_pretrained(path)
    return path


def _generate(path: str, prompts, params: SamplingParams, **engine_args):
    llm = LLM(path, max_model_len=256, cache_memory_gb=0.02, max_num_batched_tokens=64, **engine_args)
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [(s.token_ids, [e.logprob for e in s.logprobs], o.num_cached_tokens) for o in outs for s in o.outputs]
    finally:
        llm.engine.shutdown()


def _assert_same(sharded, whole) -> None:
    for (tokens, logprobs, _), (ref_tokens, ref_logprobs, _) in zip(sharded, whole, strict=True):
        assert tokens == ref_tokens
        assert max(abs(a - b) for a, b in zip(logprobs, ref_logprobs, strict=True)) < 1e-4


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tp", "tp+ep"])
def test_sharded_engine_matches_one_process(checkpoint, expert_parallel):
    """Greedy decoding over chunked prefills (64-token steps) and a turn that resumes from the prefix cache (the
    cache copies replayed on the worker), then seeded sampling with n=2 sharing a prompt."""
    greedy = SamplingParams(max_tokens=10, temperature=0, logprobs=0)
    turn = PROMPTS[2] + [5, 6, 7]
    sampled = SamplingParams(max_tokens=6, temperature=1.0, seed=3, n=2, logprobs=0)
    results = []
    for args in ({}, {"tensor_parallel_size": 2, "enable_expert_parallel": expert_parallel}):
        llm = LLM(checkpoint, max_model_len=256, cache_memory_gb=0.02, max_num_batched_tokens=64, **args)
        try:
            runs = [
                llm.generate(PROMPTS, greedy, use_tqdm=False),
                llm.generate([turn], greedy, use_tqdm=False),
                llm.generate([PROMPTS[1]], sampled, use_tqdm=False),
            ]
        finally:
            llm.engine.shutdown()
        results.append(
            [
                (s.token_ids, [e.logprob for e in s.logprobs], o.num_cached_tokens)
                for r in runs
                for o in r
                for s in o.outputs
            ]
        )
    sharded, whole = results[1], results[0]
    _assert_same(sharded, whole)
    assert sharded[len(PROMPTS)][2] == whole[len(PROMPTS)][2] > 0  # the second turn reused the first's cache


def test_prompt_logprobs_sharded(checkpoint):
    """Prompt scoring calls the split LM head on prompt rows: the workers take part in those gathers too."""
    params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=2)
    results = []
    threads = torch.get_num_threads()
    for args in ({}, {"tensor_parallel_size": 2}):
        llm = LLM(checkpoint, max_model_len=256, cache_memory_gb=0.02, **args)
        try:
            (out,) = llm.generate([PROMPTS[2]], params, use_tqdm=False)
        finally:
            llm.engine.shutdown()
        results.append([v for e in out.prompt_logprobs[1:] for v in (e.logprob, *(lp for _, lp in e.top))])
    assert max(abs(a - b) for a, b in zip(*results, strict=True)) < 1e-4
    assert torch.get_num_threads() == threads  # the driver's threads, shared out while sharded, come back


# ---------------------------------------------------------------------------------------------------- loading
def _whole_and_shards(path: str, expert_parallel: bool, dtype=torch.float32):
    whole = MiniMaxForCausalLM.from_pretrained(path, dtype=dtype)
    shards = [load_shard(path, ParallelGroup(r, 2, expert_parallel), dtype=dtype) for r in range(2)]
    return whole, shards


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tp", "ep"])
@pytest.mark.parametrize("layout", ["official", "stacked"])
def test_each_rank_loads_exactly_its_slices(tmp_path, expert_parallel, layout):
    """Per-expert w1/w3/w2 (official names) and stacked gate_up_proj / down_proj (transformers' names) both land in
    the right slices; every tensor of a rank equals the same cut of the whole model's."""
    model = tiny_model("tiny-m1", num_attention_heads=6, num_key_value_heads=2)
    if layout == "official":
        model.save_pretrained(tmp_path)
    else:
        model.config.save_pretrained(tmp_path, dialect="transformers")
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(tmp_path, "model.safetensors")
        )
    whole, shards = _whole_and_shards(str(tmp_path), expert_parallel)
    full = whole.state_dict()
    for rank, shard in enumerate(shards):
        cuts = plan_cuts(whole.config, ParallelGroup(rank, 2, expert_parallel))
        for name, tensor in shard.state_dict().items():
            expected = cuts[name].take(full[name]) if name in cuts else full[name]
            assert torch.equal(tensor, expected), name


def test_fp8_checkpoint_sliced_across_scale_blocks(tmp_path):
    """An FP8 checkpoint whose per-rank slices start inside a 128 x 128 scale block (intermediate 200: 100 rows a
    rank): each slice is dequantised with the scales that cover it, equal to the slice of the dequantised whole."""
    _fp8_checkpoint(tmp_path)
    whole, shards = _whole_and_shards(str(tmp_path), False, dtype=torch.bfloat16)
    full = whole.state_dict()
    for rank, shard in enumerate(shards):
        cuts = plan_cuts(whole.config, ParallelGroup(rank, 2))
        for name, tensor in shard.state_dict().items():
            expected = cuts[name].take(full[name]) if name in cuts else full[name]
            assert torch.equal(tensor, expected), name


# ---------------------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize(
    ("preset", "size", "expert_parallel"),
    [("minimax-m2", 4, False), ("minimax-m2", 4, True), ("minimax-m1-80k", 8, False), ("minimax-m1-80k", 8, True)],
)
def test_full_size_rank_holds_its_share(preset, size, expert_parallel):
    """On the meta device, the full-size models: every sharded tensor of a rank is 1/N of the whole (the vocabulary
    rounds up), the rest is replicated, and the ranks' sharded parts add up to the whole model's."""
    config = MiniMaxConfig.from_preset(preset)
    with torch.device("meta"):
        whole = MiniMaxForCausalLM(config)
    full = {n: p.numel() for n, p in whole.named_parameters()}
    cuts = plan_cuts(config, ParallelGroup(0, size, expert_parallel))
    sharded_total = 0
    for rank in range(size):
        with torch.device("meta"):
            model = MiniMaxForCausalLM(config)
        shard_model(model, ParallelGroup(rank, size, expert_parallel))
        for name, param in model.named_parameters():
            if name in cuts:
                share = -(-full[name] // size) if "embed" in name or "lm_head" in name else full[name] // size
                assert param.numel() <= share and (param.numel() == share or rank == size - 1), name
                sharded_total += param.numel()
            else:
                assert param.numel() == full[name], name
    assert sharded_total == sum(full[n] for n in cuts)
    replicated = sum(v for n, v in full.items() if n not in cuts)
    assert replicated < 0.01 * sum(full.values())  # norms and routers: next to nothing


def test_unfit_sizes_are_refused():
    config = MiniMaxConfig.from_preset("tiny-m1")  # 4 heads, 2 KV heads, 4 experts
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 .*num_attention_heads=4"):
        plan_cuts(config, ParallelGroup(0, 3))
    with pytest.raises(ValueError, match="num_local_experts=4"):
        plan_cuts(config.replace(num_attention_heads=8, num_key_value_heads=8), ParallelGroup(0, 8, True))
    with pytest.raises(ValueError, match="enable_expert_parallel"):
        LLM(tiny_model("tiny-m1"), enable_expert_parallel=True)
    with pytest.raises(ValueError, match="give a checkpoint path"):
        LLM(tiny_model("tiny-m1"), tensor_parallel_size=2)


# ---------------------------------------------------------------------------------------------------- server
@pytest.mark.parametrize(("model", "flags"), [("m2", ["--enable-expert-parallel"]), ("hybrid", [])])
def test_served_sharded_model_answers_like_one_process(tmp_path, tiny_tokenizer, model, flags):
    """`mmx serve --tensor-parallel-size 2` (expert parallel for M2) through the openai SDK: the same greedy tokens
    and log-probs as one process."""
    openai = pytest.importorskip("openai")
    from tests.helpers import serve

    preset, overrides = MODELS[model]
    tiny_model(preset, **overrides).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    (expected,) = _generate(str(tmp_path), [PROMPTS[0]], SamplingParams(max_tokens=8, temperature=0, logprobs=0))
    with serve(str(tmp_path), "--tensor-parallel-size", "2", *flags) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        reply = client.completions.create(
            model=tmp_path.name, prompt=PROMPTS[0], max_tokens=8, temperature=0, logprobs=0,
            extra_body={"return_token_ids": True},
        )  # fmt: skip
    choice = reply.choices[0]
    logprobs = choice.logprobs.token_logprobs
    assert max(abs(a - b) for a, b in zip(logprobs, expected[1], strict=True)) < 1e-4
    assert choice.text == tiny_tokenizer.decode(expected[0])
    assert json.loads(reply.model_dump_json())["choices"][0]["finish_reason"] == "length"


def test_fp8_kept_fp8_when_sharded(tmp_path):
    """quantization='fp8' with tensor_parallel_size=2: each rank keeps its slices FP8 (one byte a weight, the factors
    of its own blocks) and the sharded engine answers as the one-process FP8 engine does. The blocks are 20 x 20 here
    so that the 100-row slices of the 200-wide experts start on block boundaries."""
    from mmx.model.fp8_linear import holds_fp8

    _fp8_checkpoint(tmp_path, block=(20, 20))
    path = str(tmp_path)
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=0)
    whole = _generate(path, PROMPTS[:2], params, quantization="fp8", dtype="float32")
    for expert_parallel in (False, True):
        sharded = _generate(
            path, PROMPTS[:2], params, quantization="fp8", dtype="float32", tensor_parallel_size=2,
            enable_expert_parallel=expert_parallel,
        )  # fmt: skip
        _assert_same(sharded, whole)
    dense = MiniMaxForCausalLM.from_pretrained(path, dtype=torch.float32)
    shard = load_shard(path, ParallelGroup(1, 2), dtype=torch.float32, keep_fp8=True)
    assert holds_fp8(shard)
    fp8_bytes = sum(b.nbytes for n, b in shard.named_buffers() if b.dtype == torch.float8_e4m3fn)
    dense_fp8_part = sum(p.numel() for n, p in dense.named_parameters() if "proj" in n) // 2
    assert fp8_bytes == dense_fp8_part  # half of every projection, one byte each


def test_fp8_split_through_scale_blocks_is_refused(tmp_path):
    _fp8_checkpoint(tmp_path)  # 128 x 128 blocks; each rank's 100 expert rows would cut one
    with pytest.raises(ValueError, match="cut through 128-wide FP8 scale blocks"):
        load_shard(str(tmp_path), ParallelGroup(0, 2), keep_fp8=True)


def test_torchrun_ranks_serve_the_driver(tmp_path, tiny_tokenizer):
    """Under torchrun the engine uses the ranks torchrun started (rank 0 runs the program, the others serve it):
    `mmx generate` prints what one process prints."""
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this interpreter")
    preset, overrides = MODELS["hybrid"]
    tiny_model(preset, **overrides).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    flags = ["generate", str(tmp_path), "--prompt", "The quick brown fox", "--max-tokens", "8", "--temperature", "0", "--max-model-len",
             "128", "--cache-memory-gb", "0.01", "--json"]  # fmt: skip
    env = {**os.environ, "MMX_LOG_LEVEL": "WARNING", "PYTHONPATH": os.getcwd()}

    def run(command: list[str]) -> str:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    one = run([sys.executable, "-m", "mmx.cli.main", *flags])
    two = run([torchrun, "--nproc-per-node", "2", "-m", "mmx.cli.main", *flags, "--tensor-parallel-size", "2"])
    assert [json.loads(line) for line in two.splitlines()] == [json.loads(line) for line in one.splitlines()]


def test_preemption_under_a_cache_for_few_sequences(checkpoint):
    """Six sequences of 80-130 tokens over a cache of 20 blocks (per rank, its heads): sequences are preempted and
    recomputed, the same way in both engines, and the tokens stay those of one process."""
    from mmx.engine.cache import CacheLayout
    from mmx.parallel.sharding import local_cache_config

    config = MiniMaxConfig.from_pretrained(checkpoint)
    prompts = [[(7 * i + j) % 500 + 3 for j in range(50 + 5 * i)] for i in range(6)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=0)
    results = []
    for size in (1, 2):
        local = local_cache_config(config, size)
        budget = 20 * CacheLayout.bytes_per_block(local, 16, torch.float32) + 6 * CacheLayout.bytes_per_slot(local)
        llm = LLM(checkpoint, max_model_len=128, cache_memory_gb=budget / 2**30, tensor_parallel_size=size)
        try:
            outs = llm.generate(prompts, params, use_tqdm=False)
            assert llm.engine.scheduler.num_preemptions > 0
        finally:
            llm.engine.shutdown()
        results.append([(s.token_ids, [e.logprob for e in s.logprobs], 0) for o in outs for s in o.outputs])
    _assert_same(results[1], results[0])


def test_workers_end_when_the_driver_is_killed(checkpoint):
    """A driver killed with SIGKILL (no atexit, no stop message) takes its workers with it within seconds."""
    import signal
    import subprocess
    import sys
    import time

    code = (
        "import sys, time\n"
        "from mmx import LLM\n"
        f"llm = LLM({checkpoint!r}, max_model_len=128, cache_memory_gb=0.01, tensor_parallel_size=2)\n"
        "print(*(p.pid for p in llm.engine.workers.processes), flush=True)\n"
        "time.sleep(600)\n"
    )
    env = {**os.environ, "MMX_LOG_LEVEL": "WARNING", "PYTHONPATH": os.getcwd()}
    driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    worker = int(driver.stdout.readline())
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    deadline = time.time() + 10
    while time.time() < deadline and os.path.exists(f"/proc/{worker}") and "zombie" not in _state(worker):
        time.sleep(0.2)
    assert not os.path.exists(f"/proc/{worker}") or "zombie" in _state(worker)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(line for line in f if line.startswith("State")).lower()
    except (OSError, StopIteration):
        return "gone"


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tp", "ep"])
def test_int8_experts_on_sharded_ranks(checkpoint, expert_parallel):
    """experts_int8 quantises each rank's experts after loading. Under expert parallelism a rank holds whole experts,
    whose per-row scales are those of one process: the same tokens. Tensor parallel splits every down projection's
    rows, each half with its own scale (finer, not the same): the first token's log-prob stays close."""
    params = SamplingParams(max_tokens=4, temperature=0, logprobs=0)
    whole = _generate(checkpoint, PROMPTS[:2], params, quantization="experts_int8")
    sharded = _generate(
        checkpoint, PROMPTS[:2], params, quantization="experts_int8", tensor_parallel_size=2,
        enable_expert_parallel=expert_parallel,
    )  # fmt: skip
    if expert_parallel:
        assert [tokens for tokens, _, _ in sharded] == [tokens for tokens, _, _ in whole]
    for (tokens, logprobs, _), (ref_tokens, ref_logprobs, _) in zip(sharded, whole, strict=True):
        assert len(tokens) == 4 and tokens[0] == ref_tokens[0]
        assert abs(logprobs[0] - ref_logprobs[0]) < 0.05
