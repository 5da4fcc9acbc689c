"""Training: SFT loss masks, packed documents, schedules, MoE balancing, checkpoints that resume exactly after a
SIGKILL, and FSDP2 under torchrun against a single process."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mmx.chat.template import builtin_template, render_chat
from mmx.chat.tokenizer import M2_SPECIAL_TOKENS, Tokenizer, train_bpe_tokenizer
from mmx.config import MiniMaxConfig
from mmx.model.cache import PackedDocuments
from mmx.model.modeling import MiniMaxForCausalLM
from mmx.tasks.arithmetic import make_problems, sft_record
from mmx.train.config import TrainConfig
from mmx.train.data import IGNORE, BatchStream, Document, PackedDataset, chat_document, load_documents, pack
from mmx.train.loop import Trainer, load_balancing_loss, lr_factor, moe_blocks

TEMPLATE = builtin_template("minimax_m2")


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    """100 training and 20 eval chats of the arithmetic task, and a tokenizer trained on them."""
    d = tmp_path_factory.mktemp("sft")
    records = [sft_record(p, use_tool=i % 2 == 0, system=i % 3 == 0) for i, p in enumerate(make_problems(0, 120))]
    for name, part in (("train.jsonl", records[:100]), ("eval.jsonl", records[100:])):
        with open(d / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    texts = [render_chat(TEMPLATE, r["messages"], tools=r.get("tools")) for r in records]
    tok = train_bpe_tokenizer(
        texts, 600, M2_SPECIAL_TOKENS, eos_token="[e~[", chat_template=TEMPLATE, split_digits=True
    )
    tok.save_pretrained(d / "tok")
    return d


def config_for(sft_dir, out_dir, **changes) -> dict:
    cfg = {
        "model": "tiny-m1",
        "tokenizer": str(sft_dir / "tok"),
        "task": "sft",
        "train_data": [str(sft_dir / "train.jsonl")],
        "eval_data": [str(sft_dir / "eval.jsonl")],
        "seq_len": 256,
        "batch_size": 2,
        "steps": 6,
        "warmup_steps": 2,
        "eval_every": 3,
        "eval_batches": 2,
        "save_every": 3,
        "out_dir": str(out_dir),
        "progress": False,
    }
    cfg.update(changes)
    return cfg


def losses(out_dir) -> dict[int, float]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


# ---------------------------------------------------------------------------------------------------- data
def test_sft_loss_only_on_assistant_tokens(sft_dir):
    tok = Tokenizer.from_pretrained(sft_dir / "tok")
    record = sft_record(make_problems(5, 1)[0], use_tool=True)
    doc = chat_document(tok, TEMPLATE, record)
    text, spans = render_chat(TEMPLATE, record["messages"], tools=record["tools"], return_generation_spans=True)
    assert len(spans) == 2  # the tool-calling turn and the answer
    target_text = tok.decode([i for i, t in zip(doc.ids, doc.targets) if t], skip_special_tokens=False)
    assert target_text == "".join(text[a:b] for a, b in spans)
    other_text = tok.decode([i for i, t in zip(doc.ids, doc.targets) if not t], skip_special_tokens=False)
    question = record["messages"][1]["content"]
    assert question in other_text and question not in target_text  # the user's words carry no loss
    assert "<response>" in other_text and "<response>" not in target_text  # nor do tool results
    assert "# Tools" in other_text and "]~b]ai" in other_text  # nor the system prompt and role headers
    for piece in ("<think>", "</think>", "<minimax:tool_call>", '<parameter name="expression">', "[e~["):
        assert piece in target_text  # reasoning, tool calls and the end of turn do
    # Collated labels: a position is labelled exactly when the next token of its document is a target.
    batch = PackedDataset([doc], 1024, seed=0).collate([[0]])
    n = len(doc)
    expected = [doc.ids[j + 1] if doc.targets[j + 1] else IGNORE for j in range(n - 1)] + [IGNORE]
    assert batch.labels[0, :n].tolist() == expected
    assert (batch.labels[0, n:] == IGNORE).all() and (batch.doc_ids[0, n:] == -1).all()


def test_pretraining_documents_and_packing(tmp_path):
    tok = train_bpe_tokenizer(["hello world " * 20, "packed rows"], 300, M2_SPECIAL_TOKENS, eos_token="[e~[")
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "packed rows"}) + "\n\n" + json.dumps({"text": "hello"}) + "\n"
    )
    files = [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]
    docs = load_documents(files, "pretrain", tok, None, seq_len=64)
    assert [tok.decode(d.ids, skip_special_tokens=False) for d in docs] == [
        "hello world[e~[",
        "packed rows[e~[",
        "hello[e~[",
    ]
    assert all(all(d.targets) for d in docs)
    pieces = load_documents(files, "pretrain", tok, None, seq_len=3)  # long documents are cut into rows
    assert all(len(p) <= 3 for p in pieces) and sum(map(len, pieces)) <= sum(map(len, docs))
    rows = pack([5, 4, 3, 6, 2], list(range(5)), 8)
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 3, 4]
    assert all(sum([5, 4, 3, 6, 2][i] for i in r) <= 8 for r in rows)
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\n')
    with pytest.raises(ValueError, match="record 1 has no 'text'"):
        load_documents([str(tmp_path / "bad.jsonl")], "pretrain", tok, None, 8)
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        load_documents([str(tmp_path / "missing.txt")], "pretrain", tok, None, 8)


def test_batch_stream_is_a_function_of_its_position():
    docs = [Document([1] * n, [True] * n) for n in (3, 5, 2, 7, 4, 6, 1, 8)]
    dataset = PackedDataset(docs, 8, seed=3)
    stream = BatchStream(dataset, 2)
    first = [stream.next_rows() for _ in range(7)]  # crosses epochs
    again = BatchStream(PackedDataset(docs, 8, seed=3), 2)
    again.load_state_dict({"epoch": 0, "offset": 0})
    assert [again.next_rows() for _ in range(7)] == first
    resumed = BatchStream(PackedDataset(docs, 8, seed=3), 2)
    stream = BatchStream(PackedDataset(docs, 8, seed=3), 2)
    for _ in range(3):
        stream.next_rows()
    resumed.load_state_dict(stream.state_dict())
    assert [resumed.next_rows() for _ in range(4)] == first[3:]


@pytest.mark.parametrize("preset", ["tiny-m1", "tiny-m2"])
def test_packed_documents_do_not_see_each_other(preset):
    """A row packing two documents gives each the logits it gets alone (lightning states restart, the softmax mask
    is block-diagonal, positions restart)."""
    torch.manual_seed(0)
    model = MiniMaxForCausalLM(MiniMaxConfig.from_preset(preset)).eval()
    a, b = torch.randint(0, 500, (1, 37)), torch.randint(0, 500, (1, 50))
    ids = torch.cat([a, b, torch.zeros(1, 13, dtype=torch.long)], dim=1)
    doc_ids = torch.tensor([[0] * 37 + [1] * 50 + [-1] * 13])
    with torch.no_grad():
        packed = model(ids, cache=PackedDocuments(doc_ids))
        alone_a, alone_b = model(a), model(b)
    torch.testing.assert_close(packed[:, :37], alone_a, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(packed[:, 37:87], alone_b, atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------- optimisation pieces
def test_schedule_and_weight_decay_groups(sft_dir, tmp_path):
    cfg = TrainConfig.from_dict(config_for(sft_dir, tmp_path, steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4))
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(55, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # half way down the cosine
    assert lr_factor(100, cfg) == pytest.approx(0.1)
    trainer = Trainer(cfg)
    decay, rest = trainer.optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in rest["params"])
    norms = {id(m.weight) for n, m in trainer.model.named_modules() if n.endswith("norm")}
    assert norms and norms <= {id(p) for p in rest["params"]}


def test_load_balancing_loss_is_k_when_balanced_and_grows_when_not():
    model = MiniMaxForCausalLM(MiniMaxConfig.from_preset("tiny-m1"))
    block = moe_blocks(model)[0]
    e, k, n = 4, 2, 8
    ids = torch.tensor([[i % e, (i + 1) % e] for i in range(n)])
    block.routing = (torch.zeros(n, e), ids)
    valid = torch.ones(n, dtype=torch.bool)
    assert float(load_balancing_loss([block], valid)) == pytest.approx(k)
    skewed = torch.zeros(n, e)
    skewed[:, 0] = 3.0
    block.routing = (skewed, torch.tensor([[0, 1]] * n))
    assert float(load_balancing_loss([block], valid)) > k


def test_routing_bias_moves_towards_balance(sft_dir, tmp_path):
    """M2's aux-loss-free balancing: after a step, experts chosen more than average have a lower bias."""
    trainer = Trainer(TrainConfig.from_dict(config_for(sft_dir, tmp_path, model="tiny-m2", routing_bias_rate=0.01)))
    trainer.train_step()
    for block in trainer.blocks:
        bias = block.e_score_correction_bias
        assert bias is not None and float(bias.abs().max()) == pytest.approx(0.01)
    # the rule on given loads: sign(mean load - load) times the rate
    loads = [torch.tensor([10.0, 0.0, 5.0, 5.0, 1.0, 9.0, 5.0, 5.0])]
    block = trainer.blocks[0]
    before = block.e_score_correction_bias.clone()
    trainer.blocks = [block]
    trainer._update_routing_bias(loads)
    assert (block.e_score_correction_bias - before).tolist() == pytest.approx([-0.01, 0.01, 0, 0, 0.01, -0.01, 0, 0])


def test_activation_checkpointing_and_bf16_keep_the_step(sft_dir, tmp_path):
    """Recomputing activations gives the same loss and gradients; bf16 autocast trains with float32 routers."""
    results = []
    for checkpointing in (False, True):
        cfg = TrainConfig.from_dict(
            config_for(sft_dir, tmp_path / str(checkpointing), activation_checkpointing=checkpointing)
        )
        trainer = Trainer(cfg)
        record = trainer.train_step()
        results.append((record["loss"], record["grad_norm"], [p.detach().clone() for p in trainer.model.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-5)
    for p, q in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    trainer = Trainer(TrainConfig.from_dict(config_for(sft_dir, tmp_path / "bf16", precision="bf16")))
    record = trainer.train_step()
    assert math.isfinite(record["loss"]) and abs(record["loss"] - results[0][0]) < 0.05
    assert trainer.model.model.layers[0].mlp.gate.weight.dtype == torch.float32


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="'learning_rate'"):
        TrainConfig.from_dict({"learning_rate": 1.0})
    with pytest.raises(ValueError, match="'precision'"):
        TrainConfig.from_dict({"precision": "fp8"})
    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: 5\ntrain_data: [data.jsonl]\n")
    loaded = TrainConfig.load(str(cfg), ["lr=0.01", "task=pretrain"])
    assert loaded.steps == 5 and loaded.lr == 0.01 and loaded.task == "pretrain"
    assert loaded.train_data == [str(tmp_path / "data.jsonl")]  # relative to the config file
    from mmx.cli.train import overrides_from_flags

    assert overrides_from_flags(["--lr", "1e-3", "--steps=4", "--out-dir", "x"]) == ["lr=1e-3", "steps=4", "out_dir=x"]


# ---------------------------------------------------------------------------------------------------- end to end
def run_cli(args: list[str], **kwargs) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "mmx.cli.main", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def test_sigkill_then_resume_gives_the_same_losses(sft_dir, tmp_path):
    cfg = tmp_path / "train.json"
    cfg.write_text(json.dumps(config_for(sft_dir, tmp_path / "unused", steps=10, save_every=2, eval_every=0)))
    reference = run_cli(["train", str(cfg), "--out-dir", str(tmp_path / "ref")])
    assert reference.wait(timeout=300) == 0, reference.stdout.read()

    killed = run_cli(["train", str(cfg), "--out-dir", str(tmp_path / "run")])
    deadline = time.time() + 120
    while not os.path.exists(tmp_path / "run" / "checkpoint-4" / "trainer_state.pt"):
        assert killed.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    partial = losses(tmp_path / "run")
    assert 4 <= max(partial) < 10  # it really died mid-run

    resumed = run_cli(["train", str(cfg), "--out-dir", str(tmp_path / "run"), "--resume"])
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")  # every step, bit for bit
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint-10", "checkpoint-8", "loss.png", "metrics.jsonl"]


def test_checkpoint_loads_in_mmx_engine_and_transformers(sft_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mmx
    from mmx.engine import SamplingParams
    from mmx.llm import LLM

    trainer = Trainer(TrainConfig.from_dict(config_for(sft_dir, tmp_path, steps=3, save_every=3, eval_every=0)))
    trainer.train()
    path = tmp_path / "checkpoint-3"
    ours = mmx.load_model(path, dtype="float32")
    ids = torch.tensor([Tokenizer.from_pretrained(path).encode("Tom has 12 apples.")])
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)
        trained = dict(trainer.model.state_dict())
        for key, value in ours.state_dict().items():
            torch.testing.assert_close(value, trained[key])
    hf_tok = AutoTokenizer.from_pretrained(path)
    assert hf_tok("Tom has 12 apples.")["input_ids"] == ids[0].tolist()
    out = LLM(str(path), max_model_len=512).generate(
        "Tom has", SamplingParams(max_tokens=4, temperature=0), use_tqdm=False
    )
    assert len(out[0].outputs[0].token_ids) >= 1


def test_fsdp2_two_processes_match_one(sft_dir, tmp_path):
    """torchrun, 2 CPU processes over gloo, FSDP2 with one unit per decoder layer, against one process with the same
    global batch (2 rows per process per micro-batch = 2 rows x 2 accumulation steps in one process: the same micro-
    batches, so the MoE auxiliary loss, which is per micro-batch, is the same too). Tolerance 1e-5 relative."""
    cfg = tmp_path / "train.json"
    cfg.write_text(json.dumps(config_for(sft_dir, tmp_path / "unused", steps=5, eval_every=5, save_every=5)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "mmx.cli.main",
            "train",
            str(cfg),
            "--out-dir",
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stdout + two.stderr
    one = run_cli(["train", str(cfg), "--out-dir", str(tmp_path / "one"), "--grad-accum", "2"])
    out, _ = one.communicate(timeout=300)
    assert one.returncode == 0, out
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert a.keys() == b.keys() == set(range(1, 6))
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5)
    assert a[5] < a[1]  # and it learns
    # the checkpoint written from the shards holds the same weights as the single-process one
    import mmx

    w1 = mmx.load_model(tmp_path / "one" / "checkpoint-5", dtype="float32").state_dict()
    w2 = mmx.load_model(tmp_path / "two" / "checkpoint-5", dtype="float32").state_dict()
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], atol=1e-5, rtol=1e-4)


def test_gradient_accumulation_matches_a_larger_batch(sft_dir, tmp_path):
    """The loss is normalised by the step's token count, so 2 rows x 2 accumulation steps equal 4 rows."""
    runs = []
    for bs, accum in ((4, 1), (2, 2)):
        cfg = config_for(
            sft_dir, tmp_path / f"{bs}x{accum}", steps=3, batch_size=bs, grad_accum=accum, aux_loss_coef=0.0
        )
        runs.append([r["loss"] for r in Trainer(TrainConfig.from_dict(cfg)).train()])
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)


def test_tokenizer_train_cli(sft_dir, tmp_path):
    proc = run_cli(
        [
            "tokenizer",
            "train",
            str(sft_dir / "train.jsonl"),
            "--out",
            str(tmp_path / "tok"),
            "--vocab-size",
            "400",
            "--split-digits",
        ]
    )
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    tok = Tokenizer.from_pretrained(tmp_path / "tok")
    assert tok.vocab_size <= 400 and tok.eos_token == "[e~["
    assert [tok.decode([i]) for i in tok.encode("x 1234")][-4:] == ["1", "2", "3", "4"]
    for special in ("<think>", "<minimax:tool_call>", "]~b]"):
        assert len(tok.encode(special)) == 1
    assert "<minimax:tool_call>" in tok.chat_template
