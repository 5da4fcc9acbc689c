"""Build llama.cpp's ``llama-bench`` and ``llama-server`` from the llama.cpp source vendored in the
``llama-cpp-python`` sdist on PyPI, and convert the bench checkpoints to GGUF with llama.cpp's own
``convert_hf_to_gguf.py``. Everything lands in a cache outside the repository; every step is skipped when its
output is already there.

    python scripts/build_llamacpp.py                      # build, then write the bench checkpoints and their GGUFs
    python scripts/build_llamacpp.py --build-only
    python scripts/build_llamacpp.py --convert DIR --outtype q8_0 --out model.gguf

Cache: ``$MMX_LLAMACPP_CACHE`` or ``~/.cache/mmx/llama.cpp``:

    <cache>/<version>/llama.cpp/          the vendored tree (its converter patched, see below)
    <cache>/<version>/build/bin/          llama-bench, llama-server
    <cache>/checkpoints/<name>/           safetensors checkpoints written by mmx (official M1 / M2 dialect)
    <cache>/checkpoints/<name>-<type>.gguf

The converter needs three local fixes for these checkpoints, applied to the cached copy (never to the repo):
  * the BPE pre-tokenizer is recognised by a hash of the tokenizer's output on a fixed text, and a tokenizer
    trained by mmx has a hash llama.cpp does not know. ``convert()`` reads the pre-tokenizer from tokenizer.json
    (individual digits then GPT-2 byte-level: llama.cpp's ``starcoder``; byte-level alone: ``gpt-2``) and the
    patched converter uses it when the hash is unknown.
  * the MiniMax-01 converter writes no layer layout, and llama.cpp then assumes softmax every 8th layer; the patch
    writes ``attention.recurrent_layers`` from ``attn_type_list`` (the tiny models have softmax every 2nd or 4th).
  * it reads ``model.safetensors.index.json`` to find the embedding; a single-file checkpoint has no index.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

# The sdist whose vendored llama.cpp the patches below were written against; another may move the patched lines.
LLAMA_CPP_PYTHON_VERSION = os.environ.get("MMX_LLAMA_CPP_PYTHON_VERSION", "0.3.36")
TARGETS = ("llama-bench", "llama-server")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",  # the host's own ISA (AVX-512 / AMX where present), as a user building it would get
    "-DLLAMA_CURL=OFF",  # older trees fetch models over curl; nothing is fetched here
    "-DLLAMA_OPENSSL=OFF",  # newer trees use httplib + OpenSSL instead of curl
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # the server's web UI is downloaded from the Hub otherwise
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
)
PATCH_MARK = "# mmx-bench patch"


def cache_dir() -> str:
    return os.environ.get("MMX_LLAMACPP_CACHE") or os.path.expanduser("~/.cache/mmx/llama.cpp")


@dataclass(frozen=True)
class LlamaCpp:
    tree: str  # the vendored llama.cpp source
    bin_dir: str

    @property
    def bench(self) -> str:
        return os.path.join(self.bin_dir, "llama-bench")

    @property
    def server(self) -> str:
        return os.path.join(self.bin_dir, "llama-server")

    @property
    def converter(self) -> str:
        return os.path.join(self.tree, "convert_hf_to_gguf.py")

    def describe(self) -> str:
        """The llama.cpp version, as its own binary reports it (build number and commit)."""
        out = subprocess.run([self.server, "--version"], capture_output=True, text=True)
        line = next((x for x in (out.stdout + out.stderr).splitlines() if x.startswith("version")), "version ?")
        return f"llama.cpp {line.split(':', 1)[-1].strip()} (vendored in llama-cpp-python {LLAMA_CPP_PYTHON_VERSION})"


def log(message: str) -> None:
    print(f"[build_llamacpp] {message}", file=sys.stderr, flush=True)


def fetch_source(root: str) -> str:
    """The vendored llama.cpp tree of the pinned llama-cpp-python sdist, unpacked once."""
    tree = os.path.join(root, "llama.cpp")
    if os.path.exists(os.path.join(tree, "CMakeLists.txt")):
        return tree
    sdist_dir = os.path.join(root, "sdist")
    os.makedirs(sdist_dir, exist_ok=True)
    sdists = glob.glob(os.path.join(sdist_dir, "llama_cpp_python-*.tar.gz"))
    if not sdists:
        log(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist from PyPI")
        pip = [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"]
        subprocess.run([*pip, "--no-binary", ":all:", "--no-deps", "-d", sdist_dir], check=True)
        sdists = glob.glob(os.path.join(sdist_dir, "llama_cpp_python-*.tar.gz"))
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
    staging = tree + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    log(f"unpacking {os.path.basename(sdists[0])}")
    with tarfile.open(sdists[0]) as tar:
        members = []
        for member in tar.getmembers():
            if member.name.startswith(prefix):
                member.name = member.name[len(prefix) :]
                members.append(member)
        if not members:
            raise RuntimeError(f"{sdists[0]} holds no {prefix}")
        tar.extractall(staging, members=members, filter="data")
    os.rename(staging, tree)
    return tree


def build(root: str, tree: str, jobs: int) -> str:
    bin_dir = os.path.join(root, "build", "bin")
    if all(os.access(os.path.join(bin_dir, t), os.X_OK) for t in TARGETS):
        return bin_dir
    build_dir = os.path.join(root, "build")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    log(f"configuring llama.cpp in {build_dir}")
    subprocess.run(["cmake", "-S", tree, "-B", build_dir, *generator, *CMAKE_FLAGS], check=True)
    log(f"building {', '.join(TARGETS)} with {jobs} jobs (about 10-20 minutes on 2 cores)")
    subprocess.run(["cmake", "--build", build_dir, "--target", *TARGETS, "-j", str(jobs)], check=True)
    return bin_dir


# ---------------------------------------------------------------------------------------------------- converter
def _patch_file(path: str, old: str, new: str) -> None:
    """Replace the one occurrence of ``old`` by ``new``; a no-op when ``new`` is already there."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if new in text:
        return
    if text.count(old) != 1:
        raise RuntimeError(
            f"cannot patch {path}: expected one {old.strip()!r}, found {text.count(old)} "
            f"(written for llama-cpp-python {LLAMA_CPP_PYTHON_VERSION})"
        )
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace(old, new))


def patch_converter(tree: str) -> None:
    base = os.path.join(tree, "conversion", "base.py")
    # An unknown tokenizer hash: take the pre-tokenizer convert() read from tokenizer.json.
    unknown = '        if res is None:\n            logger.warning("\\n")\n'
    fallback = (
        f"        if res is None and os.environ.get('MMX_GGUF_PRE_TOKENIZER'):  {PATCH_MARK}\n"
        "            res = os.environ['MMX_GGUF_PRE_TOKENIZER']\n"
    )
    _patch_file(base, unknown, fallback + unknown)
    minimax = os.path.join(tree, "conversion", "minimax.py")
    # Write the layer layout: llama.cpp's minimax-01 falls back to softmax every 8th layer without it.
    rope = '        self.gguf_writer.add_rope_dimension_count(self.hparams["rotary_dim"])\n\n    _experts'
    layout = (
        f"        self.gguf_writer.add_recurrent_layers(  {PATCH_MARK}\n"
        '            [kind == 0 for kind in self.hparams["attn_type_list"]]\n'
        "        )\n"
    )
    _patch_file(minimax, rope, rope.replace("\n\n", "\n" + layout + "\n"))
    # A single-file checkpoint has no index: its one file holds the embedding.
    index = (
        '        with open(self.dir_model / "model.safetensors.index.json", "r", encoding="utf-8") as f:\n'
        '            weight_map = json.load(f)["weight_map"]\n'
    )
    single = (
        f'        weight_map = {{"model.embed_tokens.weight": "model.safetensors"}}  {PATCH_MARK}\n'
        '        if (self.dir_model / "model.safetensors.index.json").exists():\n'
        + "".join("    " + line + "\n" for line in index.splitlines())
    )
    _patch_file(minimax, index, single)


def ensure_built(jobs: int = 2) -> LlamaCpp:
    """Fetch, patch and build (each step skipped when done); the paths of the binaries and converter."""
    root = os.path.join(cache_dir(), LLAMA_CPP_PYTHON_VERSION)
    tree = fetch_source(root)
    patch_converter(tree)
    return LlamaCpp(tree=tree, bin_dir=build(root, tree, jobs))


def pre_tokenizer(model_dir: str) -> str:
    """llama.cpp's name for the pre-tokenizer of ``model_dir``'s tokenizer.json (the two mmx trains)."""
    with open(os.path.join(model_dir, "tokenizer.json"), encoding="utf-8") as f:
        pre = json.load(f).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    kinds = [(s.get("type"), s.get("individual_digits"), s.get("use_regex", True)) for s in steps]
    if kinds == [("Digits", True, True), ("ByteLevel", None, True)]:
        return "starcoder"  # digits one by one, then GPT-2's regex
    if kinds == [("ByteLevel", None, True)]:
        return "gpt-2"
    raise ValueError(f"{model_dir}/tokenizer.json: no llama.cpp pre-tokenizer known for {steps}")


def convert(llama: LlamaCpp, model_dir: str, out: str, outtype: str = "f32") -> str:
    """``model_dir`` (safetensors, official M1 or M2 dialect) as a GGUF of ``outtype`` (f32, f16, bf16, q8_0)."""
    if os.path.exists(out) and os.path.getmtime(out) >= os.path.getmtime(os.path.join(model_dir, "config.json")):
        return out
    env = {**os.environ, "MMX_GGUF_PRE_TOKENIZER": pre_tokenizer(model_dir)}
    log(f"converting {model_dir} -> {out} ({outtype})")
    command = [sys.executable, llama.converter, model_dir, "--outfile", out + ".partial", "--outtype", outtype]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {model_dir}:\n{result.stderr[-4000:]}")
    os.replace(out + ".partial", out)
    return out


# ---------------------------------------------------------------------------------------------------- checkpoints
# The bench checkpoints: mmx-tiny as shipped, and two random-weight 16M models at the tiny-hybrid bench size
# (bench/lightning.py): 8 layers, hidden 256, 4 heads x 64, 4 experts of width 512 top-2, vocab 2048.
CHECKPOINTS = ("mmx-tiny", "hybrid-16m", "m2-16m")
TITLES = {
    "mmx-tiny": "mmx-tiny (4.4M)",
    "hybrid-16m": "tiny hybrid M1 (bench config, 16M)",
    "m2-16m": "tiny M2 (16M)",
}


def _bench_tokenizer(path: str, vocab: int) -> None:
    """A byte-level BPE with one token per digit (mmx-tiny's pre-tokenizer) and exactly ``vocab`` entries, so that
    every id a random model emits decodes to text. Trained on mmx-tiny's arithmetic chats and on this repository's
    docs and source (the chats alone hold too few distinct merges)."""
    from mmx.chat.template import builtin_template, render_chat
    from mmx.chat.tokenizer import M2_SPECIAL_TOKENS, train_bpe_tokenizer
    from mmx.tasks.arithmetic import make_problems, sft_record

    template = builtin_template("minimax_m2")
    records = [sft_record(p, use_tool=i % 2 == 0, system=False) for i, p in enumerate(make_problems(0, 2000))]
    texts = [render_chat(template, r["messages"], tools=r.get("tools")) for r in records]
    for pattern in ("docs/*.md", "mmx/**/*.py"):
        for file in sorted(glob.glob(os.path.join(ROOT, pattern), recursive=True)):
            with open(file, encoding="utf-8") as f:
                texts.append(f.read())
    tokenizer = train_bpe_tokenizer(
        texts, vocab, M2_SPECIAL_TOKENS, eos_token="[e~[", chat_template=template, split_digits=True
    )
    if tokenizer.vocab_size != vocab:
        raise RuntimeError(f"the bench tokenizer has {tokenizer.vocab_size} tokens, not {vocab}")
    tokenizer.save_pretrained(path)


def _m2_config(vocab: int) -> dict:
    from mmx.presets import preset_dict

    return {
        **preset_dict("tiny-m2"),
        "attn_type_list": [1] * 8,
        "num_hidden_layers": 8,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "rotary_dim": 32,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "vocab_size": vocab,
        "max_position_embeddings": 65536,
    }


def write_checkpoint(name: str, path: str) -> str:
    """The bench checkpoint ``name`` in ``path``, in the dialect llama.cpp's converter reads (official M1 / M2)."""
    import torch

    import mmx
    from mmx.config import DIALECT_OFFICIAL
    from mmx.embedded import embedded_model_path

    if os.path.exists(os.path.join(path, "config.json")):
        return path
    staging = path + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    vocab = 2048
    if name == "mmx-tiny":
        source = embedded_model_path()
        if source is None:
            raise FileNotFoundError("the embedded mmx-tiny model is not installed")
        model = mmx.MiniMaxForCausalLM.from_pretrained(source, dtype=torch.float32)
        for file in ("tokenizer.json", "tokenizer_config.json"):
            os.makedirs(staging, exist_ok=True)
            shutil.copy(os.path.join(source, file), staging)
    elif name == "hybrid-16m":
        from lightning import tiny_hybrid_config

        config = mmx.MiniMaxConfig.from_dict(dict(tiny_hybrid_config(vocab), max_position_embeddings=65536))
        model = mmx.MiniMaxForCausalLM(config).init_weights(seed=0, std=0.05)
        _bench_tokenizer(staging, vocab)
    elif name == "m2-16m":
        model = mmx.MiniMaxForCausalLM(mmx.MiniMaxConfig.from_dict(_m2_config(vocab))).init_weights(seed=0, std=0.05)
        _bench_tokenizer(staging, vocab)
    else:
        raise ValueError(f"unknown bench checkpoint {name!r}; known: {', '.join(CHECKPOINTS)}")
    # Official dialect: the class names llama.cpp's converter registers (MiniMaxM1ForCausalLM /
    # MiniMaxM2ForCausalLM) and the keys it reads (attn_type_list, layernorm_*_alpha).
    model.save_pretrained(staging, dialect=DIALECT_OFFICIAL)
    shutil.rmtree(path, ignore_errors=True)
    os.rename(staging, path)
    return path


def prepare(llama: LlamaCpp, names: tuple[str, ...] = CHECKPOINTS, outtypes: tuple[str, ...] = ("f32", "q8_0")):
    """{name: (checkpoint dir, {outtype: gguf path})} for the bench checkpoints, written when missing."""
    root = os.path.join(cache_dir(), "checkpoints")
    os.makedirs(root, exist_ok=True)
    out = {}
    for name in names:
        path = write_checkpoint(name, os.path.join(root, name))
        ggufs = {t: convert(llama, path, os.path.join(root, f"{name}-{t}.gguf"), t) for t in outtypes}
        out[name] = (path, ggufs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build-only", action="store_true", help="build llama.cpp; write no checkpoints")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--checkpoints", default=",".join(CHECKPOINTS), help="bench checkpoints to write and convert")
    parser.add_argument("--outtypes", default="f32,q8_0", help="GGUF types for the bench checkpoints")
    parser.add_argument("--convert", metavar="DIR", help="convert this checkpoint directory instead")
    parser.add_argument("--outtype", default="f32", help="with --convert")
    parser.add_argument("--out", help="with --convert: the GGUF file")
    args = parser.parse_args()
    llama = ensure_built(args.jobs)
    print(f"{llama.describe()}\n  {llama.bench}\n  {llama.server}\n  converter {llama.converter}")
    if args.build_only:
        return
    if args.convert:
        out = args.out or os.path.join(args.convert, f"model-{args.outtype}.gguf")
        print(convert(llama, args.convert, out, args.outtype))
        return
    names = tuple(n for n in args.checkpoints.split(",") if n)
    for name, (path, ggufs) in prepare(llama, names, tuple(args.outtypes.split(","))).items():
        print(f"{name}: {path}\n  " + "\n  ".join(f"{t}: {g}" for t, g in ggufs.items()))


if __name__ == "__main__":
    main()
