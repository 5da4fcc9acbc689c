"""`mmx plan`: per-rank memory of the full-size models, checked against arithmetic done by hand from the configs."""

from __future__ import annotations

import math
import re

from mmx.cli.main import main

GIB = 2**30


def _printed(capsys, argv: list[str]) -> dict[str, int]:
    assert main(["plan", *argv]) == 0
    out = capsys.readouterr().out
    numbers = {}
    for line in out.splitlines():
        key, _, value = re.split(r"(\s{2,})", line, maxsplit=1)
        exact = re.search(r"\(([\d,]+) bytes\)", value) or re.match(r"([\d,]+)", value)
        if exact:
            numbers[key] = int(exact[1].replace(",", ""))
    return numbers


def test_minimax_m2_on_four_80gib_devices_fp8(capsys):
    """M2 (62 layers, hidden 3072, 48 q / 8 KV heads of 128, 256 experts of 1536, vocabulary 200,064), FP8 weights
    with 128 x 128 block scales, everything else bf16 (router and routing bias fp32), split 4 ways."""
    got = _printed(capsys, ["minimax-m2", "--tensor-parallel-size", "4", "--quantization", "fp8",
                            "--gpu-memory", "80GiB", "--max-model-len", "196608"])  # fmt: skip
    h, layers, v, e, i, d = 3072, 62, 200064, 256, 1536, 128
    q_rows, kv_rows, i_local = 48 // 4 * d, 8 // 4 * d, i // 4  # 1536, 256, 384 per rank

    def fp8(rows, cols):  # one byte a weight, a float32 factor per 128 x 128 block
        return rows * cols + math.ceil(rows / 128) * math.ceil(cols / 128) * 4

    per_layer = (
        fp8(q_rows, h) + 2 * fp8(kv_rows, h) + fp8(h, q_rows)  # q, k, v, o
        + (q_rows + kv_rows) * 2  # QK-norm weights (this rank's heads)
        + 2 * h * 2  # the two layer norms
        + e * h * 4 + e * 4  # router and routing bias, float32
        + e * (2 * fp8(i_local, h) + fp8(h, i_local))  # experts: gate, up, down, each a slice of 384
    )  # fmt: skip
    weights = layers * per_layer + 2 * (v // 4) * h * 2 + h * 2  # + embedding and LM head slices, final norm
    assert got["weights per rank"] == weights
    assert 52 * GIB < weights < 55 * GIB  # ~230 GB of FP8 over 4
    kv_per_token = layers * 2 * 2 * d * 2  # K and V, 2 KV heads a rank, bf16
    assert got["KV cache per token"] == kv_per_token == 63488
    assert got["state per sequence"] == 0
    left = int(80 * GIB * 0.9) - weights
    assert got["left for the cache"] == left
    assert got["one 196,608-token sequence"] == 196608 * kv_per_token
    assert got["sequences that fit"] == left // (196608 * kv_per_token) == 1


def test_minimax_m1_on_eight_80gib_devices_experts_int8(capsys):
    """M1-80k (80 layers, every 8th softmax; hidden 6144, 64 heads of 128, 8 KV heads, 32 experts of 9216,
    vocabulary 200,064) with int8 experts (a byte a weight, a bf16 scale per row), split 8 ways."""
    got = _printed(capsys, ["minimax-m1-80k", "--tensor-parallel-size", "8", "--quantization", "experts_int8",
                            "--gpu-memory", "80GiB", "--max-model-len", "81920"])  # fmt: skip
    h, layers, v, e, i, d = 6144, 80, 200064, 32, 9216, 128
    softmax, lightning = 10, 70
    heads, i_local = 64 // 8 * d, i // 8  # 1024 channels of heads, 1152 of each expert per rank
    bf16 = 2
    attention_softmax = (heads * h + 2 * d * h + h * heads) * bf16  # q, one KV head's k and v, o
    attention_lightning = (3 * heads * h + heads * h + h * heads + heads) * bf16  # qkv, gate, out, output norm
    experts = e * ((2 * i_local * h + 2 * i_local * bf16) + (h * i_local + h * bf16))  # int8 + a scale per row
    common = 2 * h * bf16 + e * h * 4 + experts  # layer norms, fp32 router, experts
    weights = softmax * attention_softmax + lightning * attention_lightning + layers * common
    weights += 2 * (v // 8) * h * bf16 + h * bf16  # embedding and LM head slices, final norm
    assert got["weights per rank"] == weights
    kv_per_token = softmax * 2 * 1 * d * bf16
    state = lightning * 8 * d * d * 4  # 8 heads a rank, float32 [D, D] each
    assert (got["KV cache per token"], got["state per sequence"]) == (kv_per_token, state) == (5120, 36700160)
    per_sequence = 81920 * kv_per_token + state
    assert got["one 81,920-token sequence"] == per_sequence
    left = int(80 * GIB * 0.9) - weights
    assert got["sequences that fit"] == left // per_sequence


def test_plan_refuses_a_split_the_model_does_not_allow(capsys):
    assert main(["plan", "minimax-m2", "--tensor-parallel-size", "5"]) != 0
    assert "tensor_parallel_size=5 does not fit this model: num_attention_heads=48" in capsys.readouterr().err
