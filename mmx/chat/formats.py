"""The MiniMax chat formats, one object per family: everything mmx knows about how a model of that family is
prompted and how its replies are written. Nothing outside ``mmx.chat`` names a format; code elsewhere asks for the
format of a checkpoint (:func:`chat_for`) and passes the :class:`ChatFormat` on.

* M1 (``minimax_m1``): ``<beginning_of_sentence>`` / ``<end_of_sentence>`` role markers; the model opens
  ``<think>`` itself; tool calls are JSON lines inside ``<tool_calls>``.
* M2 (``minimax_m2``): ``]~b]`` / ``[e~[`` role markers; the generation prompt ends inside ``<think>\\n``, so a
  reply starts in its reasoning; tool calls are ``<minimax:tool_call>`` XML.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from functools import cache

TEMPLATE_DIR = os.path.join(os.path.dirname(__file__), "templates")


@dataclass(frozen=True)
class ChatFormat:
    name: str  # also the style name the parsers take and the built-in template's file name
    special_tokens: tuple[str, ...]
    eos_token: str
    generation_prefill: str  # text the generation prompt ends with, that the reply continues
    tool_call_open: str
    architecture: str  # the model family whose checkpoints use this format by default

    @property
    def builtin_template(self) -> str:
        return _read_template(self.name)

    def forced_tool_prefix(self, tool_name: str | None) -> str:
        """Text to pre-fill after the generation prompt so that the reply is a tool call (``tool_choice``
        "required", or the named tool): the model completes the call, held to the tools' schemas by the grammar of
        :func:`mmx.chat.constraints.tool_call_grammar`, which starts where this text ends."""
        if self.name == "minimax_m2":
            return '</think>\n\n<minimax:tool_call>\n<invoke name="' + (f'{tool_name}">\n' if tool_name else "")
        return '<tool_calls>\n{"name": "' + (f'{tool_name}", "arguments": ' if tool_name else "")


M1 = ChatFormat(
    name="minimax_m1",
    special_tokens=(
        "<begin_of_document>",
        "<beginning_of_sentence>",
        "<end_of_sentence>",
        "<end_of_document>",
        "<think>",
        "</think>",
        "<tool_calls>",
        "</tool_calls>",
    ),
    eos_token="<end_of_sentence>",
    generation_prefill="",
    tool_call_open="<tool_calls>",
    architecture="minimax_m1",
)
M2 = ChatFormat(
    name="minimax_m2",
    special_tokens=(
        "]~!b[",
        "]~b]",
        "[e~[",
        "]!p~[",
        "<think>",
        "</think>",
        "<minimax:tool_call>",
        "</minimax:tool_call>",
    ),
    eos_token="[e~[",
    generation_prefill="<think>\n",
    tool_call_open="<minimax:tool_call>",
    architecture="minimax_m2",
)
FORMATS = {f.name: f for f in (M1, M2)}
# Added tokens that are text, not control: decoding with skip_special_tokens keeps them, so the reasoning and
# tool-call parsers see them (as in the released checkpoints, where only role markers, BOS / EOS and padding are
# special).
TEXT_TAGS = frozenset(
    {"<think>", "</think>", M1.tool_call_open, "</tool_calls>", M2.tool_call_open, "</minimax:tool_call>"}
)


def get_format(name: str) -> ChatFormat:
    """A format by name ("minimax_m1", "minimax_m2"; "m1" / "m2" also accepted)."""
    key = name if name in FORMATS else f"minimax_{name}"
    if key not in FORMATS:
        raise ValueError(f"unknown chat format {name!r}; mmx knows {', '.join(FORMATS)}")
    return FORMATS[key]


def format_for_architecture(architecture: str) -> ChatFormat:
    return M2 if architecture == M2.architecture else M1


def detect_format(template: str | None, architecture: str) -> ChatFormat:
    """The format a checkpoint's replies are written in: from its chat template's tool-call syntax, else from the
    model's architecture (a template that never mentions tools says nothing)."""
    for fmt in (M2, M1):
        if template and fmt.tool_call_open in template:
            return fmt
    return format_for_architecture(architecture)


@cache
def _read_template(name: str) -> str:
    with open(os.path.join(TEMPLATE_DIR, f"{name}.jinja"), encoding="utf-8") as f:
        return f.read()


def builtin_template(name: str) -> str:
    """mmx's own template of a format: "minimax_m1" or "minimax_m2"."""
    if name not in FORMATS:
        raise ValueError(f"unknown chat template {name!r}; mmx ships {' and '.join(FORMATS)}")
    return _read_template(name)


def resolve_template(option: str | None, checkpoint_template: str | None, architecture: str) -> str:
    """The template to render with. ``option``: a ``.jinja`` file, a built-in name, or None / "tokenizer" for the
    checkpoint's own template (from ``tokenizer_config.json`` / ``chat_template.jinja``), which is preferred when
    present; the built-in template of the checkpoint's family is the fallback."""
    if option and (os.path.exists(option) or option.endswith(".jinja")):
        if not os.path.isfile(option):
            raise FileNotFoundError(f"chat template file {option!r} does not exist")
        with open(option, encoding="utf-8") as f:
            return f.read()
    if option and option != "tokenizer":
        return builtin_template(get_format(option).name)
    if checkpoint_template:
        return checkpoint_template
    return format_for_architecture(architecture).builtin_template


@dataclass(frozen=True)
class ChatSetup:
    """What a model is chatted with: the template that renders prompts and the format its replies are parsed in."""

    template: str
    format: ChatFormat


def chat_for(tokenizer, architecture: str, option: str | None = None) -> ChatSetup:
    """The chat setup of a checkpoint (its tokenizer and architecture), ``option`` overriding the template."""
    template = resolve_template(option, getattr(tokenizer, "chat_template", None), architecture)
    return ChatSetup(template, detect_format(template, architecture))


# Tool-call ids: each API has its own spelling of a random id.
TOOL_CALL_ID_PREFIXES = {"openai": "call_", "anthropic": "toolu_"}


def new_tool_call_id(api: str = "openai") -> str:
    return TOOL_CALL_ID_PREFIXES[api] + uuid.uuid4().hex[:24]


def tool_call_id_for(api: str, call_id: str) -> str:
    """The same call's id in another API's spelling (the random part kept)."""
    for prefix in TOOL_CALL_ID_PREFIXES.values():
        if call_id.startswith(prefix):
            return TOOL_CALL_ID_PREFIXES[api] + call_id[len(prefix) :]
    return call_id
