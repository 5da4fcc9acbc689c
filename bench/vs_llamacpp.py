"""mmx against llama.cpp on the same checkpoints, in one run: llama.cpp's own tools (llama-bench, llama-server) on
GGUFs made by its own converter from the checkpoints mmx runs. Every figure is the median of ``--repeats`` runs,
mmx and llama.cpp alternating (which goes first alternates too), ``--threads`` threads on both sides.

    python scripts/build_llamacpp.py                 # once: build llama.cpp, write and convert the checkpoints
    python bench/vs_llamacpp.py                      # everything (about an hour on 2 cores)
    python bench/vs_llamacpp.py --quick              # small sizes, 2 repeats: a few minutes
    python bench/vs_llamacpp.py --check              # greedy agreement with llama.cpp (f32 GGUF), then exit

Sections (``--sections``):
  prefill   prompt tokens/s for one ``--prefill``-token prompt: engine (default chunking) vs llama-bench pp
  decode    batch-1 decode tokens/s after a 16-token prompt: engine steps vs llama-bench tg
  context   batch-1 decode tokens/s after ``--contexts`` tokens: engine steps vs llama-bench tg with -d
  server    generated tokens/s over ``--concurrency`` simultaneous /v1/completions requests (token-id prompts,
            greedy, ignore_eos, the same prompts and max_tokens): `mmx serve` vs `llama-server`
  memory    resident memory of both servers, at their defaults, after ``--memory-requests`` requests

``--check`` instead runs the agreement check: mmx and llama.cpp (f32 GGUF, f32 KV, flash attention off) decode the
same greedy tokens from the same prompt ids, and the largest gap between their top-5 log-probabilities per step.

Types (``--types``): f32 runs mmx in float32 against the f32 GGUF; q8_0 runs llama.cpp's Q8_0 GGUF against mmx
with ``--quantization int8`` (noted and skipped on the mmx side when the engine refuses the option).
llama.cpp runs at its defaults otherwise (f16 KV cache, flash attention auto, batch 2048 / micro-batch 512); mmx at
the engine's defaults plus ``--mmx-arg`` settings (passed to the in-process engine and to `mmx serve` alike).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from build_llamacpp import CHECKPOINTS, TITLES, LlamaCpp, cache_dir, ensure_built, prepare
from lightning import table

import mmx
from mmx.engine import SamplingParams
from mmx.llm import LLM
from mmx.utils.memory import tune_allocator

MMX_DTYPE = {"f32": "float32", "q8_0": "float32"}
MMX_QUANT = {"f32": None, "q8_0": "int8"}
MMX_LABEL = {"f32": "mmx fp32", "q8_0": "mmx int8"}
LLAMA_LABEL = {"f32": "llama.cpp f32", "q8_0": "llama.cpp Q8_0"}


def log(message: str) -> None:
    print(f"[vs_llamacpp] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------- the machine
def machine_lines(threads: int) -> list[str]:
    """CPU model, core count and SIMD flags (lscpu), memory, load, and the software on both sides."""
    info: dict[str, str] = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        info = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}
    except (OSError, subprocess.CalledProcessError):
        pass
    simd = sorted(
        f for f in info.get("Flags", "").split() if f.startswith(("avx", "amx", "fma", "f16c", "sse4", "vnni"))
    )
    with open("/proc/meminfo") as f:
        mem_gb = int(next(line.split()[1] for line in f if line.startswith("MemTotal"))) / 2**20
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        f"CPU: {info.get('Model name', platform.processor() or '?')}, {os.cpu_count()} cores visible, "
        f"{mem_gb:.0f} GB RAM; {threads} thread{'s' if threads != 1 else ''} on both sides",
        f"SIMD flags (lscpu): {' '.join(simd) or '?'}",
        f"torch {torch.__version__}, Python {platform.python_version()}; load average at start: {load}",
    ]


# ---------------------------------------------------------------------------------------------------- results
@dataclass
class Results:
    """Samples per (checkpoint, metric, side); a side is a column label such as "mmx fp32"."""

    samples: dict[tuple[str, str, str], list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, checkpoint: str, metric: str, side: str, value: float) -> None:
        self.samples.setdefault((checkpoint, metric, side), []).append(value)
        log(f"{checkpoint} | {metric} | {side}: {value:,.1f}")

    def median(self, checkpoint: str, metric: str, side: str) -> float | None:
        values = self.samples.get((checkpoint, metric, side))
        return statistics.median(values) if values else None

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
            log(f"note: {text}")


def alternate(repeats: int, runs: list[Callable[[], None]]) -> None:
    """Each run ``repeats`` times, interleaved; odd rounds go in reverse so that neither side always goes first."""
    for r in range(repeats):
        for run in runs if r % 2 == 0 else runs[::-1]:
            run()


# ---------------------------------------------------------------------------------------------------- mmx in-process
def random_prompt(length: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (length,), generator=g).tolist()


def engine_args(spec: list[str]) -> dict[str, Any]:
    """``--mmx-arg key=value`` settings, typed as the engine's flags are."""
    out: dict[str, Any] = {}
    for item in spec:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--mmx-arg {item!r}: expected KEY=VALUE")
        parsed: Any = value
        for kind in (int, float):
            try:
                parsed = kind(value)
                break
            except ValueError:
                pass
        if value.lower() in ("true", "false"):
            parsed = value.lower() == "true"
        out[key.replace("-", "_")] = parsed
    return out


def serve_flags(settings: dict[str, Any]) -> list[str]:
    flags = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    return flags


def load_mmx(path: str, kind: str, max_len: int, extra: dict[str, Any], results: Results) -> LLM | None:
    """The engine over ``path`` for ``kind`` (f32: float32; q8_0: int8 weights), or None when mmx refuses it."""
    kwargs = dict(extra, dtype=MMX_DTYPE[kind], max_model_len=max_len, max_num_seqs=4)
    if MMX_QUANT[kind]:
        kwargs["quantization"] = MMX_QUANT[kind]
    try:
        return LLM(path, **kwargs)
    except (TypeError, ValueError) as e:
        if MMX_QUANT[kind] and "quantization" in str(e):
            results.note(f"mmx int8 skipped: the engine refuses quantization={MMX_QUANT[kind]!r} ({e})")
            return None
        raise


def mmx_prefill(llm: LLM, prompt: list[int]) -> float:
    """Prompt tokens/s: from admitting the request to its first generated token (the engine's own chunking)."""
    engine = llm.engine
    request = f"prefill-{time.monotonic_ns()}"
    start = time.perf_counter()
    engine.add_request(request, prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    return len(prompt) / (time.perf_counter() - start)


def mmx_decode(llm: LLM, prompt: list[int], new_tokens: int) -> float:
    """Batch-1 decode tokens/s after ``prompt``: the steps after the first token (prefill excluded)."""
    engine = llm.engine
    request = f"decode-{time.monotonic_ns()}"
    engine.add_request(request, prompt, SamplingParams(temperature=0, max_tokens=new_tokens + 1, ignore_eos=True))
    while not engine.requests[request].seqs[0].output_token_ids:
        engine.step()
    start = time.perf_counter()
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    return steps / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------- llama-bench
def llama_bench(llama: LlamaCpp, gguf: str, threads: int, prompt: int, gen: int, depth: int = 0) -> float:
    """tokens/s of one llama-bench test (after its warm-up run): pp ``prompt`` or tg ``gen`` at ``depth``."""
    command = [llama.bench, "-m", gguf, "-t", str(threads), "-p", str(prompt), "-n", str(gen), "-r", "1", "-o", "json"]
    if depth:
        command += ["-d", str(depth)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{out.stderr[-3000:]}")
    return float(json.loads(out.stdout)[0]["avg_ts"])


# ---------------------------------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    kind: str  # "mmx" or "llama"
    process: subprocess.Popen
    url: str
    log_path: str

    def rss_mb(self) -> tuple[float, float]:
        """(resident, peak resident) MiB of the server process."""
        fields = {}
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields[key] = value
        return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))  # type: ignore[return-value]

    def log_tail(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-3000:]


@contextmanager
def running(name: str, kind: str, command: list[str], env: dict[str, str], log_dir: str, timeout: float = 600):
    """A server process, ready (its /health answers 200), stopped on exit; None when it exits while starting."""
    port = free_port()
    command = [c.replace("{port}", str(port)) for c in command]
    log_path = os.path.join(log_dir, f"{name.replace(' ', '_')}-{port}.log")
    log(f"starting {name}: {shlex.join(command)}")
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    server = Server(name, kind, process, f"http://127.0.0.1:{port}", log_path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                yield None if process.returncode == 2 else _failed(server)
                return
            try:
                if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready after {timeout:.0f} s:\n{server.log_tail()}")
            time.sleep(0.3)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _failed(server: Server):
    raise RuntimeError(f"{server.name} exited with {server.process.returncode}:\n{server.log_tail()}")


def mmx_server_command(path: str, kind: str, max_seqs: int | None, max_len: int | None, extra: dict[str, Any]):
    command = [sys.executable, "-m", "mmx.cli.main", "serve", path, "--port", "{port}", "--log-level", "warning"]
    command += ["--served-model-name", "bench"]
    command += ["--dtype", MMX_DTYPE[kind], *serve_flags(extra)]
    if MMX_QUANT[kind]:
        command += ["--quantization", MMX_QUANT[kind]]
    if max_seqs:
        command += ["--max-num-seqs", str(max_seqs)]
    if max_len:
        command += ["--max-model-len", str(max_len)]
    return command


def llama_server_command(llama: LlamaCpp, gguf: str, threads: int, slots: int | None, ctx: int | None) -> list[str]:
    command = [llama.server, "-m", gguf, "-t", str(threads), "-tb", str(threads), "--port", "{port}"]
    command += ["--host", "127.0.0.1"]
    if slots:
        command += ["-np", str(slots), "-c", str(ctx)]
    return command


def completion_body(server: Server, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    if server.kind == "llama":
        # llama-server would otherwise reuse a slot's earlier prompt (mmx has no prefix cache; it refuses the field)
        body["cache_prompt"] = False
    return body


async def _burst(server: Server, prompts: list[list[int]], max_tokens: int) -> float:
    """Send every prompt at once; generated tokens/s over the wall time of the whole burst."""
    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    async with httpx.AsyncClient(limits=limits, timeout=3600) as client:

        async def one(prompt: list[int]) -> int:
            r = await client.post(f"{server.url}/v1/completions", json=completion_body(server, prompt, max_tokens))
            if r.status_code != 200:
                raise RuntimeError(f"{server.name}: {r.status_code} {r.text[:500]}")
            return int(r.json()["usage"]["completion_tokens"])

        start = time.perf_counter()
        counts = await asyncio.gather(*(one(p) for p in prompts))
        elapsed = time.perf_counter() - start
    if any(c != max_tokens for c in counts):
        raise RuntimeError(f"{server.name}: generated {sorted(set(counts))} tokens, not {max_tokens} each")
    return sum(counts) / elapsed


def burst(server: Server, prompts: list[list[int]], max_tokens: int) -> float:
    return asyncio.run(_burst(server, prompts, max_tokens))


# ---------------------------------------------------------------------------------------------------- sections
@dataclass
class Bench:
    args: argparse.Namespace
    llama: LlamaCpp
    checkpoints: dict[str, tuple[str, dict[str, str]]]
    results: Results
    extra: dict[str, Any]
    log_dir: str

    def config(self, name: str) -> mmx.MiniMaxConfig:
        return mmx.MiniMaxConfig.from_pretrained(self.checkpoints[name][0])

    def gguf(self, name: str, kind: str) -> str:
        return self.checkpoints[name][1][kind]

    # ----------------------------------------------------------------- prefill, decode, context
    def engine_sections(self, name: str, sections: set[str]) -> None:
        a = self.args
        limit = self.config(name).max_position_embeddings
        tests: list[tuple[str, int, int, int]] = []  # (metric, prompt tokens, tokens timed, llama-bench depth)
        if "prefill" in sections:
            if a.prefill + 16 <= limit:
                tests.append((f"prefill {a.prefill}", a.prefill, 0, 0))
            else:
                self.results.note(f"{name}: prefill {a.prefill} skipped (the model has {limit} positions)")
        if "decode" in sections:
            tests.append(("decode, batch 1", 16, a.decode_tokens, 0))
        for c in a.contexts if "context" in sections else []:
            if c + a.decode_tokens + 16 <= limit:
                tests.append((f"decode at {c} context", c, a.decode_tokens, c))
            else:
                self.results.note(f"{name}: decode at {c} context skipped (the model has {limit} positions)")
        for kind in a.types:
            self._engine_tests(name, kind, tests)
            gc.collect()  # the engine's cache is sized from RAM: free one before the next is built

    def _engine_tests(self, name: str, kind: str, tests: list[tuple[str, int, int, int]]) -> None:
        a = self.args
        vocab = self.config(name).vocab_size
        max_len = max(prompt + timed + 16 for _, prompt, timed, _ in tests)
        llm = load_mmx(self.checkpoints[name][0], kind, max_len, self.extra, self.results)
        gguf = self.gguf(name, kind)
        if llm is not None:  # warm-up: the decode graphs, and the first steps of a fresh engine are slower
            llm.engine.warm_up()
            graph = llm.engine.decode_graph
            if graph is not None and graph.native is not None:
                self.results.note(f"{name} {kind}: mmx decode steps native (mmx.engine.native_step)")
            elif graph is not None:
                state = f"failed ({graph.failed})" if graph.failed else f"ready in {graph.compile_seconds:.0f} s"
                self.results.note(f"{name} {kind}: mmx decode graphs {state}")
            mmx_decode(llm, random_prompt(16, vocab, 99), 8)
        seeds = iter(range(1_000_000))

        def ours(prompt: int, timed: int) -> float:
            tokens = random_prompt(prompt, vocab, next(seeds))  # a fresh prompt every run
            return mmx_decode(llm, tokens, timed) if timed else mmx_prefill(llm, tokens)

        def theirs(prompt: int, timed: int, depth: int) -> float:
            return llama_bench(self.llama, gguf, a.threads, 0 if timed else prompt, timed, depth)

        for metric, prompt, timed, depth in tests:
            runs = [
                lambda m=metric, p=prompt, t=timed, d=depth: self.results.add(
                    name, m, LLAMA_LABEL[kind], theirs(p, t, d)
                )
            ]
            if llm is not None:
                runs.insert(
                    0, lambda m=metric, p=prompt, t=timed: self.results.add(name, m, MMX_LABEL[kind], ours(p, t))
                )
            alternate(a.repeats, runs)

    # ----------------------------------------------------------------- servers
    def server_section(self, name: str) -> None:
        for kind in self.args.types:
            self._server_runs(name, kind)

    def _server_runs(self, name: str, kind: str) -> None:
        a = self.args
        path = self.checkpoints[name][0]
        slots = max(a.concurrency)
        per_request = a.server_prompt + a.server_tokens + 16
        vocab = self.config(name).vocab_size
        mmx_cmd = mmx_server_command(path, kind, slots, per_request, self.extra)
        llama_cmd = llama_server_command(self.llama, self.gguf(name, kind), a.threads, slots, slots * per_request)
        with (
            running(MMX_LABEL[kind], "mmx", mmx_cmd, self.mmx_env(), self.log_dir) as ours,
            running(LLAMA_LABEL[kind], "llama", llama_cmd, os.environ.copy(), self.log_dir) as theirs,
        ):
            if ours is None:
                self.results.note(f"`mmx serve --quantization {MMX_QUANT[kind]}` refused: mmx side skipped")
            servers = [s for s in (ours, theirs) if s is not None]
            for server in servers:  # warm-up
                burst(server, [random_prompt(a.server_prompt, vocab, 7)] * 2, 4)
            for c in a.concurrency:
                for r in range(a.repeats):
                    # new prompts every round, the same for both servers; odd rounds start with the other server
                    prompts = [random_prompt(a.server_prompt, vocab, 1000 * (r + 1) + i) for i in range(c)]
                    for server in servers if r % 2 == 0 else servers[::-1]:
                        rate = burst(server, prompts, a.server_tokens)
                        self.results.add(name, f"{c} concurrent requests (server)", server.name, rate)

    def memory_section(self, name: str) -> None:
        """RSS of both servers at their defaults (dtype float32 for mmx) after ``--memory-requests`` requests."""
        a = self.args
        path = self.checkpoints[name][0]
        vocab = self.config(name).vocab_size
        mmx_cmd = mmx_server_command(path, "f32", None, None, self.extra)
        llama_cmd = llama_server_command(self.llama, self.gguf(name, "f32"), a.threads, None, None)
        with (
            running("mmx serve", "mmx", mmx_cmd, self.mmx_env(), self.log_dir) as ours,
            running("llama-server", "llama", llama_cmd, os.environ.copy(), self.log_dir) as theirs,
        ):
            for server in (ours, theirs):
                sent = 0
                while sent < a.memory_requests:
                    wave = min(16, a.memory_requests - sent)
                    prompts = [random_prompt(a.server_prompt, vocab, 5000 + sent + i) for i in range(wave)]
                    burst(server, prompts, a.server_tokens)
                    sent += wave
                rss, peak = server.rss_mb()
                self.results.add(name, f"RSS after {a.memory_requests} requests (MiB)", server.name, rss)
                self.results.add(name, f"peak RSS over {a.memory_requests} requests (MiB)", server.name, peak)

    def mmx_env(self) -> dict[str, str]:
        threads = str(self.args.threads)
        return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "MMX_LOG_LEVEL": "WARNING"}

    # ----------------------------------------------------------------- agreement
    def check(self) -> bool:
        """Greedy tokens of mmx and of llama.cpp (f32 GGUF, f32 KV, no flash attention) from the same prompt ids,
        and the largest gap between their log-probabilities of each step's top-5 tokens. mmx-tiny answers a problem
        of its training task; the random-weight checkpoints continue a random prompt for 32 tokens. Both sides stop
        at EOS (llama.cpp's ignore_eos bans EOS where mmx's only keeps going)."""
        from mmx.tasks.arithmetic import make_problems

        rows, texts, agree = [], [], True
        for name in self.checkpoints:
            llm = LLM(self.checkpoints[name][0], dtype="float32", max_model_len=1024, max_num_seqs=1, **self.extra)
            if name == "mmx-tiny":
                problem = make_problems(4321, 1)[0]
                messages = [{"role": "user", "content": problem.question}]
                prompt = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
                new_tokens = 200
            else:
                prompt, new_tokens = random_prompt(32, self.config(name).vocab_size, 4321), 32
            params = SamplingParams(temperature=0, max_tokens=new_tokens, logprobs=5)
            ours = llm.generate(prompt, params, use_tqdm=False)[0]
            ids = ours.token_ids
            command = llama_server_command(self.llama, self.gguf(name, "f32"), self.args.threads, 1, 1024)
            command += ["-fa", "off", "-ctk", "f32", "-ctv", "f32"]
            body = {"prompt": prompt, "n_predict": new_tokens, "temperature": 0, "cache_prompt": False, "n_probs": 5}
            with running(f"llama-server ({name})", "llama", command, os.environ.copy(), self.log_dir) as server:
                reply = httpx.post(f"{server.url}/completion", json={**body, "return_tokens": True}, timeout=600)
                theirs = reply.json()["tokens"]
                # One step per request, teacher-forced on mmx's tokens: llama-server leaves out the probabilities
                # of a token that ends in an incomplete UTF-8 character, which would misalign one long reply.
                gap, compared = 0.0, 0
                for k, mine in enumerate(ours.outputs[0].logprobs or []):
                    step = {**body, "prompt": prompt + ids[:k], "n_predict": 1}
                    entries = httpx.post(f"{server.url}/completion", json=step, timeout=600).json()
                    for entry in entries.get("completion_probabilities", []):
                        top = {t["id"]: t["logprob"] for t in entry["top_logprobs"]}
                        gap = max([gap, *(abs(lp - top[t]) for t, lp in mine.top if t in top)])
                        compared += 1
            first = next((i for i, (x, y) in enumerate(zip(ids, theirs)) if x != y), min(len(ids), len(theirs)))
            same = theirs == ids
            agree &= same
            verdict = "same" if same else f"**differ from token {first}**"
            rows.append([TITLES[name], len(prompt), f"{len(ids)} / {len(theirs)}", verdict, f"{gap:.1e} ({compared})"])
            if name == "mmx-tiny":
                texts += [f"mmx-tiny prompt: {problem.question!r}", f"mmx greedy: {ours.text!r}"]
                texts.append(f"llama.cpp greedy: {llm.tokenizer.decode(theirs)!r}")
            del llm
            gc.collect()
        print("\n## Agreement (f32 GGUF, f32 KV cache, flash attention off; greedy from the same prompt ids)\n")
        header = ["checkpoint", "prompt tokens", "tokens mmx / llama.cpp", "greedy tokens"]
        header.append("max |logprob diff| of the top-5 (steps compared)")
        print(table(header, rows))
        print("\n" + "\n".join(texts))
        return agree


# ---------------------------------------------------------------------------------------------------- report
def report(results: Results, args: argparse.Namespace, header: list[str]) -> str:
    lines = ["# bench/vs_llamacpp.py", "", f"Command: `python bench/vs_llamacpp.py {shlex.join(sys.argv[1:])}`", ""]
    lines += [f"- {h}" for h in header]
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    minutes = (time.monotonic() - STARTED) / 60
    lines += [f"- load average at the end: {load}; {minutes:.0f} minutes in all", ""]
    metrics: list[tuple[str, str]] = []
    for checkpoint, metric, _ in results.samples:
        if (checkpoint, metric) not in metrics and "RSS" not in metric:
            metrics.append((checkpoint, metric))
    columns = ["checkpoint", "metric (tokens/s)"]
    for kind in args.types:
        columns += [LLAMA_LABEL[kind], MMX_LABEL[kind], f"{MMX_LABEL[kind]} / {LLAMA_LABEL[kind]}"]
    if "f32" in args.types and "q8_0" in args.types:
        columns.append("mmx fp32 / llama.cpp Q8_0")
    rows = []
    for checkpoint, metric in metrics:
        row = [TITLES.get(checkpoint, checkpoint), metric]

        def get(side: str, checkpoint=checkpoint, metric=metric) -> float | None:
            return results.median(checkpoint, metric, side)

        for kind in args.types:
            theirs, ours = get(LLAMA_LABEL[kind]), get(MMX_LABEL[kind])
            row += [_fmt(theirs), _fmt(ours), _ratio(ours, theirs)]
        if "f32" in args.types and "q8_0" in args.types:
            row.append(_ratio(get(MMX_LABEL["f32"]), get(LLAMA_LABEL["q8_0"])))
        rows.append(row)
    if rows:
        lines += [f"Medians of {args.repeats} alternating runs.", "", table(columns, rows), ""]
    memory = [(c, m) for c, m, _ in results.samples if "RSS" in m]
    if memory:
        mem_rows = []
        for checkpoint, metric in dict.fromkeys(memory):
            ours = results.median(checkpoint, metric, "mmx serve")
            theirs = results.median(checkpoint, metric, "llama-server")
            mem_rows.append([TITLES.get(checkpoint, checkpoint), metric, _fmt(theirs), _fmt(ours)])
        lines += ["Servers at their defaults (mmx: --dtype float32):", ""]
        lines += [table(["checkpoint", "memory", "llama-server", "mmx serve"], mem_rows), ""]
    lines += [f"- {n}" for n in results.notes]
    noisy = [
        f"{checkpoint} / {metric} / {side}: {min(v):,.0f}-{max(v):,.0f}"
        for (checkpoint, metric, side), v in results.samples.items()
        if min(v) > 0 and max(v) / min(v) > NOISY
    ]
    if noisy:
        lines += ["", f"Samples of one side more than {NOISY}x apart (the machine was busy; medians are shaky):"]
        lines += [f"- {n}" for n in noisy]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _ratio(ours: float | None, theirs: float | None) -> str:
    return "-" if ours is None or not theirs else f"{ours / theirs:.2f}x"


# ---------------------------------------------------------------------------------------------------- main
SECTIONS = ("prefill", "decode", "context", "server", "memory")
STARTED = time.monotonic()
NOISY = 1.5  # max / min of one side's samples above which the report lists the row as noisy
SIZES = {
    "full": dict(
        types=["f32", "q8_0"],
        repeats=3,
        prefill=4096,
        decode_tokens=128,
        contexts=[1024, 16384],
        concurrency=[16, 32],
        server_prompt=128,
        server_tokens=128,
        memory_requests=100,
    ),
    "quick": dict(
        types=["f32"],
        repeats=2,
        prefill=512,
        decode_tokens=32,
        contexts=[1024],
        concurrency=[16],
        server_prompt=32,
        server_tokens=32,
        memory_requests=32,
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x]

    def names(text: str) -> list[str]:
        return [x for x in text.split(",") if x]

    p.add_argument("--sections", type=names, default=list(SECTIONS), help=f"any of {','.join(SECTIONS)}")
    p.add_argument("--checkpoints", type=names, default=list(CHECKPOINTS), help=f"any of {','.join(CHECKPOINTS)}")
    p.add_argument("--context-checkpoints", type=names, default=["hybrid-16m", "m2-16m"])
    p.add_argument("--memory-checkpoints", type=names, default=["mmx-tiny", "hybrid-16m"])
    p.add_argument("--types", type=names, help="f32 and/or q8_0")
    p.add_argument("--threads", type=int, default=2)
    # Sizes: unset ones take the full run's value, or with --quick the quick run's (see SIZES)
    p.add_argument("--repeats", type=int)
    p.add_argument("--prefill", type=int, help="prompt tokens of the prefill test")
    p.add_argument("--decode-tokens", type=int, help="tokens timed in each decode test")
    p.add_argument("--contexts", type=ints, help="context lengths of the decode test")
    p.add_argument("--concurrency", type=ints, help="simultaneous requests in the server test")
    p.add_argument("--server-prompt", type=int, help="prompt tokens of each server request")
    p.add_argument("--server-tokens", type=int, help="max_tokens of each server request")
    p.add_argument("--memory-requests", type=int)
    p.add_argument("--mmx-arg", action="append", default=[], metavar="KEY=VALUE", help="an engine setting for mmx")
    p.add_argument("--quick", action="store_true", help="small sizes, 2 repeats, f32 only (a few minutes)")
    p.add_argument("--check", action="store_true", help="run only the agreement check (greedy tokens, logprobs)")
    p.add_argument("--json", help="also write every sample here")
    args = p.parse_args(argv)
    for key, value in SIZES["quick" if args.quick else "full"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for what, given, known in (
        ("section", args.sections, SECTIONS),
        ("checkpoint", args.checkpoints, CHECKPOINTS),
        ("type", args.types, tuple(MMX_DTYPE)),
    ):
        unknown = [x for x in given if x not in known]
        if unknown:
            p.error(f"unknown {what} {', '.join(unknown)}; known: {', '.join(known)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tune_allocator()
    torch.set_num_threads(args.threads)
    extra = engine_args(args.mmx_arg)
    llama = ensure_built()
    names = tuple(args.checkpoints)
    checkpoints = prepare(llama, names, ("f32",) if args.check else tuple(args.types))
    log_dir = os.path.join(cache_dir(), "logs")
    os.makedirs(log_dir, exist_ok=True)
    results = Results()
    bench = Bench(args, llama, checkpoints, results, extra, log_dir)
    header = [*machine_lines(args.threads), llama.describe()]
    if args.check:
        return 0 if bench.check() else 1
    sections = set(args.sections)
    for name in names:
        wanted = {s for s in sections if s in ("prefill", "decode")}
        if "context" in sections and name in args.context_checkpoints:
            wanted.add("context")
        if wanted:
            bench.engine_sections(name, wanted)
        if "server" in sections:
            bench.server_section(name)
    if "memory" in sections:
        for name in args.memory_checkpoints:
            if name in checkpoints:
                bench.memory_section(name)
    text = report(results, args, header)
    print(text)
    if args.json:
        samples = [{"checkpoint": c, "metric": m, "side": s, "samples": v} for (c, m, s), v in results.samples.items()]
        with open(args.json, "w") as f:
            json.dump({"header": header, "notes": results.notes, "samples": samples}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
