"""Text around the model: tokenizer, chat templates, and parsers for reasoning and tool calls."""

from mmx.chat.reasoning import ReasoningStreamParser, split_reasoning
from mmx.chat.template import builtin_template, render_chat
from mmx.chat.tokenizer import IncrementalDetokenizer, Tokenizer, train_bpe_tokenizer
from mmx.chat.tool_calls import ContentDelta, ToolCallArgs, ToolCallStart, ToolCallStreamParser, parse_tool_calls

__all__ = [
    "ContentDelta",
    "IncrementalDetokenizer",
    "ReasoningStreamParser",
    "Tokenizer",
    "ToolCallArgs",
    "ToolCallStart",
    "ToolCallStreamParser",
    "builtin_template",
    "parse_tool_calls",
    "render_chat",
    "split_reasoning",
    "train_bpe_tokenizer",
]
