"""Bad checkpoints fail with an error that names the offending file, tensor or config key: safetensors headers,
the shard index, weight dtypes, NaN / Inf weights, config sizes against the weights (checked before a model is
built), and tokenizer / chat-template files that do not parse."""

from __future__ import annotations

import json
import os
import struct
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import mmx
from mmx import CheckpointError, ConfigError
from mmx.chat.tokenizer import Tokenizer
from mmx.cli.main import main
from mmx.errors import FileFormatError
from mmx.model.safetensors_io import SafetensorsError, SafetensorsReader

from .conftest import tiny_model
from .test_checkpoints import _fp8_checkpoint

EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"
Q_PROJ = "model.layers.3.self_attn.q_proj.weight"


def _saved(path, preset: str = "tiny-m1", dialect: str | None = None) -> str:
    tiny_model(preset).save_pretrained(path, dialect=dialect)
    return str(path)


def _edit_tensors(path, edit) -> None:
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


def _edit_json(file, edit) -> None:
    with open(file, encoding="utf-8") as f:
        data = json.load(f)
    data = edit(data) or data
    with open(file, "w", encoding="utf-8") as f:
        json.dump(data, f)


def _read_raw(file) -> tuple[dict, bytes]:
    with open(file, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_raw(file, header, data: bytes) -> None:
    encoded = json.dumps(header).encode()
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded + data)


# ---------------------------------------------------------------------------------------------------- safetensors
def _shape(header, key, shape):
    header[key]["shape"] = shape


def _offsets(header, key, offsets):
    header[key]["data_offsets"] = offsets


def _overlap(header):
    # The norm weight (128 floats) made to read the first 512 bytes of the embedding.
    header[NORM]["data_offsets"] = [header[EMBED]["data_offsets"][0], header[EMBED]["data_offsets"][0] + 512]


HEADER_CASES = {
    "not an object": (lambda h: list(h.items()), r"the header is a JSON list, not an object"),
    "entry not an object": (lambda h: h.update({NORM: "F32"}), rf"{NORM}'?: entry is a str, not an object"),
    "unknown dtype": (lambda h: h[NORM].update(dtype="Q4_K"), r"unsupported dtype 'Q4_K'"),
    "dtype not a string": (lambda h: h[NORM].update(dtype=["F32"]), r"unsupported dtype \['F32'\]"),
    "negative shape": (lambda h: _shape(h, NORM, [-128]), r"shape \[-128\] is not a list of non-negative integers"),
    "negative offset": (lambda h: _offsets(h, NORM, [-512, 0]), r"data_offsets \[-512, 0\] are not two non-negative"),
    "one offset": (lambda h: _offsets(h, NORM, [0]), r"data_offsets \[0\] are not two non-negative integers"),
    "begin after end": (
        lambda h: _offsets(h, NORM, h[NORM]["data_offsets"][::-1]),
        r"begin after they end",
    ),
    "past the data": (
        lambda h: _offsets(h, NORM, [10**9, 10**9 + 512]),
        r"run past the \d+-byte data section",
    ),
    "size not dtype x shape": (lambda h: _shape(h, NORM, [127]), r"hold 512 bytes, but F32 \[127\] needs 508"),
    "overlapping tensors": (_overlap, rf"the byte ranges of tensors '{NORM}' and '{EMBED}' overlap"),
    "metadata not an object": (lambda h: h.update(__metadata__=["pt"]), r"__metadata__ is a list, not an object"),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_bad_safetensors_header_names_the_file_and_tensor(case, tmp_path):
    path = _saved(tmp_path)
    file = os.path.join(path, "model.safetensors")
    header, data = _read_raw(file)
    mutate, message = HEADER_CASES[case]
    header = mutate(header) or header
    _write_raw(file, header, data)
    with pytest.raises(SafetensorsError, match=message) as e:
        mmx.load_model(path)
    assert str(e.value).startswith(file)


def test_zero_size_tensors_and_gaps_are_not_overlaps(tmp_path):
    """Empty tensors may share an offset, and unused bytes between tensors harm nothing: both are accepted."""
    file = tmp_path / "x.safetensors"
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "empty1": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]},
        "empty2": {"dtype": "BF16", "shape": [3, 0], "data_offsets": [8, 8]},
        "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]},
    }
    _write_raw(file, header, struct.pack("<4f", 1.0, 2.0, 99.0, 3.0))
    reader = SafetensorsReader(file)
    assert reader.read("a").tolist() == [1.0, 2.0] and reader.read("b").tolist() == [3.0]
    assert reader.read("empty2").shape == (3, 0)


# ---------------------------------------------------------------------------------------------------- the index
INDEX_CASES = {
    "weight_map a list": (lambda d: d.update(weight_map=list(d["weight_map"].items())), "weight_map is a list"),
    "index a list": (lambda d: [d], "not a safetensors index"),
    "no weight_map": (lambda d: d.pop("weight_map"), "not a safetensors index"),
    "shard outside": (
        lambda d: d["weight_map"].update({EMBED: "../../etc/passwd"}),
        rf"places '{EMBED}' in '../../etc/passwd', which is not a file name in the checkpoint",
    ),
    "shard not a string": (lambda d: d["weight_map"].update({EMBED: 3}), "3, which is not a file name"),
}


@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_bad_index_names_the_index_file(case, tmp_path):
    tiny_model("tiny-m1").save_pretrained(tmp_path, max_shard_size="300KB")
    index = tmp_path / "model.safetensors.index.json"
    edit, message = INDEX_CASES[case]
    _edit_json(index, edit)
    with pytest.raises(CheckpointError, match=message) as e:
        mmx.load_model(tmp_path)
    assert str(index) in str(e.value)


def test_index_that_is_not_json_names_the_file(tmp_path):
    tiny_model("tiny-m1").save_pretrained(tmp_path, max_shard_size="300KB")
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: not valid JSON"):
        mmx.load_model(tmp_path)


# ---------------------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize(
    "key, dtype", [(EMBED, torch.int64), (NORM, torch.bool), (Q_PROJ, torch.int32), (NORM, torch.uint8)]
)
def test_integer_and_bool_weights_are_refused_naming_the_tensor(key, dtype, tmp_path):
    path = _saved(tmp_path)
    _edit_tensors(path, lambda t: t.update({key: torch.ones_like(t[key]).to(dtype)}))
    with pytest.raises(CheckpointError, match=rf"{key} is stored as {dtype}; a floating-point weight is expected"):
        mmx.load_model(path)


def test_float64_weights_are_fine(tmp_path):
    model = tiny_model("tiny-m1")
    path = _saved(tmp_path)
    _edit_tensors(path, lambda t: t.update({k: v.double() for k, v in t.items()}))
    loaded = mmx.load_model(path, dtype="float32")
    ids = torch.randint(0, 512, (1, 7))
    torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_fp8_scale_stored_as_integers_is_refused(tmp_path):
    _, stored = _fp8_checkpoint(tmp_path)
    key = "model.layers.0.self_attn.q_proj.weight_scale_inv"
    stored[key] = stored[key].to(torch.int32)
    save_file(stored, os.path.join(tmp_path, "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"{key} is stored as torch.int32; FP8 scales are float32"):
        mmx.load_model(tmp_path)


# ---------------------------------------------------------------------------------------------------- NaN / Inf
@pytest.mark.parametrize(
    "key, index, value, counts",
    [
        (Q_PROJ, (3, 5), float("nan"), "1 NaN and 0 infinite"),
        (EMBED, (7,), float("inf"), "0 NaN and 128 infinite"),
        (NORM, (0,), float("-inf"), "0 NaN and 1 infinite"),
        # A per-expert tensor lands in a slice of the stacked expert weight: still named by its checkpoint name.
        ("model.layers.1.block_sparse_moe.experts.2.w3.weight", (0, 0), float("nan"), "1 NaN and 0 infinite"),
    ],
)
def test_non_finite_weights_are_refused_naming_the_tensor(key, index, value, counts, tmp_path):
    path = _saved(tmp_path)

    def poison(t):
        t[key][index] = value

    _edit_tensors(path, poison)
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' in model\.safetensors holds {counts} values") as e:
        mmx.load_model(path)
    assert "allow_non_finite_weights=True" in str(e.value) and "--allow-non-finite-weights" in str(e.value)
    model = mmx.load_model(path, allow_non_finite_weights=True)  # the opt-out loads it as it is
    state = dict(model.state_dict())
    poisoned = [name for name, t in state.items() if not torch.isfinite(t).all()]
    assert len(poisoned) == 1


def test_values_that_overflow_the_load_dtype_are_refused(tmp_path):
    path = _saved(tmp_path)
    _edit_tensors(path, lambda t: t[NORM].__setitem__(3, 1e6))  # finite in float32, infinite in float16
    assert mmx.load_model(path, dtype="float32").model.norm.weight[3] == 1e6
    with pytest.raises(CheckpointError, match=r"stored as torch.float32, loaded as torch.float16"):
        mmx.load_model(path, dtype="float16")


def test_non_finite_fp8_scale_is_refused(tmp_path):
    _, stored = _fp8_checkpoint(tmp_path)
    key = "model.layers.1.self_attn.o_proj.weight"
    stored[key + "_scale_inv"][0, 1] = float("inf")
    save_file(stored, os.path.join(tmp_path, "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' .* infinite values"):
        mmx.load_model(tmp_path, dtype="float32")


def test_fp8_checkpoint_with_its_scales_passes_the_checks(tmp_path):
    """float8 weights and their float32 scales are legitimate: nothing here is non-finite or the wrong kind."""
    _fp8_checkpoint(tmp_path)
    loaded = mmx.load_model(tmp_path, dtype="float32")
    assert all(torch.isfinite(t).all() for t in loaded.state_dict().values())


def test_allow_non_finite_weights_flag_through_the_cli(tmp_path, tiny_tokenizer, capsys):
    """`mmx generate` refuses the checkpoint without a traceback, and --allow-non-finite-weights loads it. The NaN sits
    in the embedding row of a token the prompt never uses, so the run itself stays finite."""
    tiny_model("tiny-m2").save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    unused = tiny_tokenizer.token_to_id("]~!b[")
    _edit_tensors(tmp_path, lambda t: t[EMBED][unused].fill_(float("nan")))
    argv = ["generate", str(tmp_path), "--prompt", "Weather in", "--max-tokens", "2", "--max-model-len", "64"]
    assert main([*argv, "--cache-memory-gb", "0.01"]) == 1
    err = capsys.readouterr().err
    assert f"tensor '{EMBED}' in model.safetensors holds 128 NaN" in err and "Traceback" not in err
    assert main([*argv, "--cache-memory-gb", "0.01", "--allow-non-finite-weights"]) == 0
    assert "--- 'Weather in'" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------- config vs weights
def _with_config(tmp_path, changes: dict, dialect: str = "transformers") -> str:
    path = _saved(tmp_path, dialect=dialect)

    def edit(config):
        for key, value in changes.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value

    _edit_json(os.path.join(path, "config.json"), edit)
    return path


def test_config_without_hidden_size_names_the_key(tmp_path):
    path = _with_config(tmp_path, {"hidden_size": None})
    with pytest.raises(ConfigError, match="is missing") as e:
        mmx.load_model(path)
    assert e.value.key == "hidden_size"


@pytest.mark.parametrize(
    "changes, key, message",
    [
        (
            {"num_hidden_layers": 10**9, "layer_types": None},
            "num_hidden_layers",
            r"1000000000, but the checkpoint holds weights for layers 0\.\.3 \(4 of them\)",
        ),
        ({"num_hidden_layers": 3, "layer_types": None}, "num_hidden_layers", "holds layers up to 3"),
        ({"vocab_size": 10**12}, "vocab_size", rf"vocab_size = {10**12}, but {EMBED} has shape \[512, 128\]"),
        ({"hidden_size": 4096}, "hidden_size", rf"hidden_size = 4096, but {EMBED} has shape"),
        ({"num_attention_heads": 10**7, "num_key_value_heads": 1}, "num_attention_heads", "head_dim"),
        ({"num_local_experts": 10**7}, "num_local_experts", r"gate\.weight has shape \[4, 128\]"),
        ({"intermediate_size": 10**9}, "intermediate_size", r"experts\.0\.w1\.weight has shape \[256, 128\]"),
    ],
)
def test_config_sizes_are_checked_against_the_weights_before_building(changes, key, message, tmp_path):
    """Absurd sizes are refused from the shard headers before a model (or even the config's per-layer lists) is
    built: 10 million layers used to hang, and 10**9 would need gigabytes just for the config."""
    path = _with_config(tmp_path, changes)
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=message) as e:
        mmx.load_model(path)
    assert e.value.key == key
    assert time.perf_counter() - started < 10  # milliseconds of work; generous for a shared machine


def test_missing_layer_in_the_middle_is_named(tmp_path):
    path = _saved(tmp_path)
    _edit_tensors(path, lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.2.")])
    with pytest.raises(ConfigError, match=r"model\.layers\.2\.\* is absent"):
        mmx.load_model(path)


def test_m2_layers_past_the_last_are_still_mtp(tmp_path):
    """M2 numbers its MTP modules after the last decoder layer, so extra layers are skipped there (not in M1)."""
    path = _saved(tmp_path, "tiny-m2")
    _edit_tensors(path, lambda t: t.update({"model.layers.2.self_attn.q_proj.weight": torch.zeros(4, 4)}))
    assert mmx.load_model(path).config.num_hidden_layers == 2


# ---------------------------------------------------------------------------------------------------- tokenizer files
@pytest.fixture
def tokenizer_dir(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save_pretrained(tmp_path)
    return tmp_path


def _config_edit(tokenizer_dir, **changes):
    _edit_json(tokenizer_dir / "tokenizer_config.json", lambda d: d.update(changes))


TOKENIZER_CASES = {
    "tokenizer.json garbage": (
        lambda d: (d / "tokenizer.json").write_text("garbage{"),
        "tokenizer.json",
        "not a tokenizer the tokenizers library can read",
    ),
    "tokenizer.json wrong object": (
        lambda d: (d / "tokenizer.json").write_text('{"model": 3}'),
        "tokenizer.json",
        "not a tokenizer the tokenizers library can read",
    ),
    "tokenizer_config.json garbage": (
        lambda d: (d / "tokenizer_config.json").write_text("{garbage"),
        "tokenizer_config.json",
        "not valid JSON",
    ),
    "tokenizer_config.json a list": (
        lambda d: (d / "tokenizer_config.json").write_text("[1, 2]"),
        "tokenizer_config.json",
        "holds a JSON list, not an object",
    ),
    "tokenizer_config.json not UTF-8": (
        lambda d: (d / "tokenizer_config.json").write_bytes(b'{"eos_token": "\xff\xfe"}'),
        "tokenizer_config.json",
        "not UTF-8 text",
    ),
    "eos_token a number": (
        lambda d: _config_edit(d, eos_token=5),
        "tokenizer_config.json",
        "eos_token is 5, not a token string",
    ),
    "chat_template a number": (
        lambda d: _config_edit(d, chat_template=42),
        "tokenizer_config.json",
        "chat_template is a int, not a template string",
    ),
    "chat_template in the config does not parse": (
        lambda d: _config_edit(d, chat_template="{% for m in messages %}{{ m }"),
        "tokenizer_config.json (key 'chat_template')",
        "the chat template does not parse",
    ),
    "chat_template.jinja does not parse": (
        lambda d: (d / "chat_template.jinja").write_text("hello\n{% if messages %}\n{{ x }\n"),
        "chat_template.jinja",
        r"the chat template does not parse: .* \(line 3\)",
    ),
    "chat_template.jinja not UTF-8": (
        lambda d: (d / "chat_template.jinja").write_bytes(b"{{ messages }}\xc3\x28"),
        "chat_template.jinja",
        "not UTF-8 text",
    ),
    "special_tokens_map.json garbage": (
        lambda d: (d / "special_tokens_map.json").write_text("nope"),
        "special_tokens_map.json",
        "not valid JSON",
    ),
}


@pytest.mark.parametrize("case", list(TOKENIZER_CASES))
def test_bad_tokenizer_files_name_the_file(case, tokenizer_dir):
    corrupt, file, message = TOKENIZER_CASES[case]
    corrupt(tokenizer_dir)
    with pytest.raises(FileFormatError, match=message) as e:
        Tokenizer.from_pretrained(tokenizer_dir)
    assert str(e.value).startswith(os.path.join(str(tokenizer_dir), file))


def test_bad_tokenizer_is_a_clean_cli_error(tmp_path, tiny_tokenizer, capsys):
    tiny_model("tiny-m2").save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{garbage")
    assert main(["generate", str(tmp_path), "--prompt", "hi", "--max-tokens", "1", "--cache-memory-gb", "0.01"]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'tokenizer_config.json'}: not valid JSON" in err and "Traceback" not in err


def test_good_tokenizer_with_template_file_still_loads(tokenizer_dir, tiny_tokenizer):
    (tokenizer_dir / "chat_template.jinja").write_text(tiny_tokenizer.chat_template)
    loaded = Tokenizer.from_pretrained(tokenizer_dir)
    messages = [{"role": "user", "content": "hi"}]
    assert loaded.apply_chat_template(messages) == tiny_tokenizer.apply_chat_template(messages)
