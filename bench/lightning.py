"""Lightning attention benchmarks; every baseline is measured in the same run.

    python bench/lightning.py                       # all CPU sections (about 10 minutes on 2 cores)
    python bench/lightning.py --sections op --quick

Sections:
  peak      fp32 and bf16 matmul throughput of this machine (the roofline everything else is compared to)
  op        forward tokens/s: mmx (fp32, bf16) vs transformers 5.23's lightning loop vs torch SDPA causal
  backward  forward + backward tokens/s: mmx vs autograd through transformers' loop
  decode    one decode step at 1K and 64K tokens of context: mmx lightning state vs a softmax KV cache
  model     8K-token prefill of a tiny hybrid M1 (6 lightning + 2 softmax layers): mmx vs transformers
  gpu       on CUDA only: mmx Triton vs fla chunk_simple_gla vs SDPA (FlashAttention), 4K-128K tokens

The transformers baseline is its own MiniMaxLightningAttention module with the projections, norm and gate replaced
by identities, so what is timed is its block loop on the same q, k, v.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mmx.ops import decay_rates, lightning_attention, lightning_decode
from mmx.ops.lightning_chunked import default_chunk_size, flops
from mmx.utils.memory import tune_allocator


# ---------------------------------------------------------------------------------------------------- helpers
def timeit(fn, repeat: int = 5, warmup: int = 1, budget: float = 20.0) -> float:
    """Median seconds per call; fewer repeats when a call is slow."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if time.perf_counter() - start > budget and len(times) >= 1:
            break
    return statistics.median(times)


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def qkv(t: int, h: int, d: int, dtype=torch.float32, device="cpu", requires_grad=False):
    """q, k, v [1, T, H, D] as views of one packed projection (the layout the model hands the op)."""
    x = F.silu(torch.randn(1, t, h, 3 * d, device=device)).to(dtype)
    if requires_grad:
        x.requires_grad_()
    return x.split(d, dim=-1)


class _Slice(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.width = width

    def forward(self, x):
        return x[..., : self.width]


def hf_lightning(h: int, d: int, layer_idx: int = 0, num_layers: int = 80):
    """transformers' MiniMaxLightningAttention reduced to its lightning loop (packed qkv in, attention out)."""
    import transformers
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

    config = transformers.MiniMaxConfig(
        hidden_size=3 * h * d,
        num_attention_heads=h,
        head_dim=d,
        num_hidden_layers=num_layers,
        layer_types=["linear_attention"] * num_layers,
    )
    module = MiniMaxLightningAttention(config, layer_idx)
    module.qkv_proj = module.act_fn = module.norm = module.out_proj = nn.Identity()
    module.output_gate = _Slice(h * d)  # sigmoid(slice) * attention: one cheap elementwise op
    return module


def hf_call(module, q, k, v):
    b, t, h, d = q.shape
    packed = torch.cat((q, k, v), dim=-1).reshape(b, t, h * 3 * d)
    return module(packed, None, None)[0]


def sdpa_call(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)


def matmul_peak(dtype: torch.dtype, n: int = 4096) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / timeit(lambda: a @ b, repeat=5) / 1e9


# ---------------------------------------------------------------------------------------------------- sections
def section_peak(args) -> dict:
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"\n## Matmul peak\n\n{machine()}\n")
    print(table(["dtype", "GFLOP/s (4096^3 matmul)"], [[k, f"{v:.0f}"] for k, v in peaks.items()]))
    return peaks


def section_op(args, peaks: dict) -> None:
    shapes = [(8, 64), (16, 128)] if args.quick else [(8, 64), (8, 128), (16, 64), (16, 128)]
    lengths = [1024, 4096, 16384] if args.quick else [1024, 2048, 4096, 8192, 16384, 32768, 65536]
    rows = []
    for h, d in shapes:
        rates = decay_rates(h, 0, 80, "transformers")
        hf = hf_lightning(h, d)
        first = {}
        for t in lengths:
            q, k, v = qkv(t, h, d)
            qb, kb, vb = (x.bfloat16() for x in (q, k, v))
            with torch.no_grad():
                ours = timeit(lambda: lightning_attention(q, k, v, rates))  # noqa: B023
                ours_bf16 = timeit(lambda: lightning_attention(qb, kb, vb, rates))  # noqa: B023
                theirs = timeit(lambda: hf_call(hf, q, k, v), repeat=3)  # noqa: B023
                sdpa = timeit(lambda: sdpa_call(q, k, v), repeat=3) if t <= args.sdpa_max else None  # noqa: B023
                sdpa_bf16 = timeit(lambda: sdpa_call(qb, kb, vb), repeat=3) if t <= args.sdpa_max else None  # noqa: B023
            first.setdefault("fp32", t / ours)
            first.setdefault("bf16", t / ours_bf16)
            gf32 = flops(t, h, d, d, default_chunk_size(h, d, torch.float32)) / ours / 1e9
            gf16 = flops(t, h, d, d, default_chunk_size(h, d, torch.bfloat16)) / ours_bf16 / 1e9
            speed = [t / x / 1e3 if x else None for x in (ours, ours_bf16, theirs, sdpa, sdpa_bf16)]
            rows.append(
                [f"{h}x{d}", t]
                + ["-" if s is None else f"{s:.1f}" for s in speed]
                + [
                    f"{theirs / ours:.1f}x",
                    f"{(t / ours) / first['fp32']:.2f} / {(t / ours_bf16) / first['bf16']:.2f}",
                    f"{gf32:.0f} ({gf32 / peaks['fp32']:.0%})",
                    f"{gf16:.0f} ({gf16 / peaks['bf16']:.0%})",
                ]
            )
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    print("\n## Forward (B=1; thousands of tokens/s)\n")
    header = ["H x D", "T", "mmx fp32", "mmx bf16", "transformers fp32", "SDPA fp32", "SDPA bf16"]
    header += ["mmx / transformers (fp32)", "tok/s vs T=1K (fp32 / bf16)"]
    header += ["mmx fp32 GFLOP/s (% fp32 peak)", "mmx bf16 GFLOP/s (% bf16 peak)"]
    print(table(header, rows))


def section_backward(args) -> None:
    cases = [(8, 64, 4096), (16, 128, 4096)]
    if not args.quick:
        cases += [(8, 64, 16384), (16, 128, 16384)]
    rows = []
    for h, d, t in cases:
        rates = decay_rates(h, 0, 80, "transformers")
        hf = hf_lightning(h, d)
        grad = torch.randn(1, t, h, d)

        leaves = [F.silu(torch.randn(1, t, h, d)) for _ in range(3)]  # independent leaves: the op's own gradients

        def ours_step():
            q, k, v = (x.detach().requires_grad_() for x in leaves)  # noqa: B023
            out, _ = lightning_attention(q, k, v, rates)  # noqa: B023
            out.backward(grad)  # noqa: B023

        def hf_step():
            q, k, v = (x.detach().requires_grad_() for x in leaves)  # noqa: B023
            out = hf_call(hf, q, k, v)  # noqa: B023
            out.backward(grad.reshape(1, t, h * d))  # noqa: B023

        ours = timeit(ours_step, repeat=3)
        theirs = timeit(hf_step, repeat=3)
        rows.append([f"{h}x{d}", t, f"{t / ours / 1e3:.1f}", f"{t / theirs / 1e3:.2f}", f"{theirs / ours:.1f}x"])
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
    print("\n## Forward + backward (fp32, B=1; thousands of tokens/s)\n")
    print(table(["H x D", "T", "mmx", "transformers autograd", "mmx / transformers"], rows))


def section_decode(args) -> None:
    rows = []
    for h, d in [(8, 64), (64, 128)]:
        rates = decay_rates(h, 0, 80)
        for context in (1024, 65536):
            q, k, v = qkv(context, h, d)
            with torch.no_grad():
                _, state = lightning_attention(q, k, v, rates)
                step = [x[:, 0].contiguous() for x in qkv(1, h, d)]
                ours = timeit(lambda: lightning_decode(*step, rates, state), repeat=200)  # noqa: B023
                kv_heads = max(1, h // 8)
                cache_k = torch.randn(1, kv_heads, context, d, dtype=torch.bfloat16)
                cache_v = torch.randn(1, kv_heads, context, d, dtype=torch.bfloat16)
                query = torch.randn(1, h, 1, d, dtype=torch.bfloat16)
                softmax = timeit(
                    lambda: F.scaled_dot_product_attention(query, cache_k, cache_v, enable_gqa=True),  # noqa: B023
                    repeat=50,
                )
            rows.append([f"{h}x{d}", context, f"{ours * 1e6:.0f}", f"{softmax * 1e6:.0f}"])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    print("\n## Decode step (one token, B=1; microseconds)\n")
    print(
        table(
            ["H x D", "context", "mmx lightning (fp32 state)", "softmax attention over a bf16 KV cache (GQA 8)"], rows
        )
    )


def tiny_hybrid_config(vocab: int = 2048) -> dict:
    """The issue's tiny hybrid M1: 8 layers (6 lightning, 2 softmax), hidden 256, 4 experts top-2."""
    lin, full = "linear_attention", "full_attention"
    return dict(
        model_type="minimax",
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=[lin, lin, lin, full, lin, lin, lin, full],
        max_position_embeddings=16384,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=None,
        eos_token_id=None,
        full_attn_alpha_factor=2.0,
        linear_attn_alpha_factor=2.0,
        mlp_alpha_factor=2.0,
    )


def model_flops(config, t: int, lightning_chunk: int) -> float:
    """FLOPs of one prefill of t tokens as computed: dense matmuls over active weights (lm_head included), causal
    softmax attention, chunked lightning attention."""
    from mmx import MiniMaxForCausalLM

    with torch.device("meta"):
        counts = MiniMaxForCausalLM(config).parameter_counts()
    lm_head = config.vocab_size * config.hidden_size
    dense = 2 * (counts["active"] + lm_head) * t
    h, d = config.num_attention_heads, config.head_dim
    softmax_layers = sum(1 for kind in config.layer_types if kind == "full_attention")
    softmax = softmax_layers * 2 * 2 * h * d * t * t / 2
    lightning = (config.num_hidden_layers - softmax_layers) * flops(t, h, d, d, lightning_chunk)
    return dense + softmax + lightning


def section_model(args, peaks: dict) -> None:
    import tempfile

    import transformers

    import mmx

    t = 2048 if args.quick else 8192
    config_dict = tiny_hybrid_config()
    config = mmx.MiniMaxConfig.from_dict(config_dict)
    ids = torch.randint(0, config.vocab_size, (1, t))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        mmx.MiniMaxForCausalLM(config).init_weights(seed=0).save_pretrained(tmp)
        for dtype in (torch.float32, torch.bfloat16):
            ours = mmx.load_model(tmp, dtype=dtype)
            theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).eval()
            with torch.no_grad():
                err = (ours(ids[:, :512]) - theirs(ids[:, :512]).logits.float()).abs().max().item()
                t_ours = timeit(lambda: ours(ids), repeat=3)  # noqa: B023
                t_theirs = timeit(lambda: theirs(ids), repeat=3)  # noqa: B023
            name = "fp32" if dtype == torch.float32 else "bf16"
            work = model_flops(config, t, default_chunk_size(config.num_attention_heads, config.head_dim, dtype))
            roofline = work / (peaks[name] * 1e9)
            rows.append(
                [
                    name,
                    f"{t / t_ours:.0f}",
                    f"{t / t_theirs:.0f}",
                    f"{t_theirs / t_ours:.2f}x",
                    f"{work / 1e9:.0f}",
                    f"{work / t_ours / 1e9:.0f}",
                    f"{roofline / t_ours:.0%}",
                    f"{err:.1e}",
                ]
            )
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    print(f"\n## Whole-model prefill, tiny hybrid M1, {t} tokens (tokens/s)\n")
    print(
        table(
            [
                "dtype",
                "mmx",
                "transformers",
                "mmx / transformers",
                "GFLOP per prefill",
                "mmx GFLOP/s",
                "mmx vs bf16/fp32 matmul roofline",
                "max |logit diff| (512 tokens)",
            ],
            rows,
        )
    )


def section_gpu(args) -> None:
    if not torch.cuda.is_available():
        print("\n## GPU\n\nno CUDA device: skipped")
        return
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError:
        chunk_simple_gla = None
    rows = []
    for h, d in [(16, 128), (64, 128)]:
        rates = decay_rates(h, 0, 80).cuda()
        for t in [4096, 16384, 65536, 131072]:
            q, k, v = qkv(t, h, d, torch.bfloat16, "cuda")

            def cuda_time(fn):
                fn()
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(5):
                    fn()
                torch.cuda.synchronize()
                return (time.perf_counter() - start) / 5

            with torch.no_grad():
                ours = cuda_time(lambda: lightning_attention(q, k, v, rates))  # noqa: B023
                fla = (
                    cuda_time(lambda: chunk_simple_gla(q, k, v, g_gamma=-rates, scale=1.0, output_final_state=True))  # noqa: B023
                    if chunk_simple_gla
                    else None
                )
                sdpa = cuda_time(lambda: sdpa_call(q, k, v)) if t <= 65536 else None  # noqa: B023
            rows.append(
                [
                    f"{h}x{d}",
                    t,
                    f"{t / ours / 1e6:.1f}",
                    "-" if fla is None else f"{t / fla / 1e6:.1f}",
                    "-" if sdpa is None else f"{t / sdpa / 1e6:.1f}",
                ]
            )
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    print(f"\n## GPU forward, bf16, B=1 (millions of tokens/s) on {torch.cuda.get_device_name()}\n")
    print(table(["H x D", "T", "mmx Triton", "fla chunk_simple_gla", "SDPA causal"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="peak,op,backward,decode,model,gpu")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and lengths")
    parser.add_argument("--sdpa-max", type=int, default=32768, help="longest T for the quadratic SDPA baseline")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    tune_allocator()  # as the mmx CLI does; it applies to the transformers baselines in this process too
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sections = args.sections.split(",")
    print(f"# bench/lightning.py {' '.join(sys.argv[1:])}\n\n{machine()}")
    peaks = section_peak(args)
    if "op" in sections:
        section_op(args, peaks)
    if "backward" in sections:
        section_backward(args)
    if "decode" in sections:
        section_decode(args)
    if "model" in sections:
        section_model(args, peaks)
    if "gpu" in sections:
        section_gpu(args)


if __name__ == "__main__":
    main()
