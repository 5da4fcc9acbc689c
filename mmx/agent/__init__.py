"""An M2-style agent loop with interleaved thinking, file / shell / Python tools and sub-agents."""

from mmx.agent.clients import AgentError, AnthropicClient, ModelTurn, OpenAIClient, ToolCall
from mmx.agent.loop import Agent, AgentResult, LiveView, Transcript
from mmx.agent.tools import Tool, ToolError, Workspace, default_tools

__all__ = [
    "Agent",
    "AgentError",
    "AgentResult",
    "AnthropicClient",
    "LiveView",
    "ModelTurn",
    "OpenAIClient",
    "Tool",
    "ToolCall",
    "ToolError",
    "Transcript",
    "Workspace",
    "default_tools",
]
