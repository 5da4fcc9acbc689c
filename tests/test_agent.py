"""The agent loop: a scripted endpoint replaying an M2 conversation (thinking, tool calls, a delegation, an answer)
for both APIs with the exact messages sent back checked; a real ``mmx serve`` process; tool confinement."""

from __future__ import annotations

import copy
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from mmx.agent import Agent, AnthropicClient, OpenAIClient, Tool, Workspace, default_tools
from mmx.agent.tools import validate
from mmx.sandbox import bwrap, sandbox_available


# ---------------------------------------------------------------------------------------------------- scripted endpoint
class ScriptedEndpoint:
    """Answers each POST with the next scripted response and records every request body."""

    def __init__(self, responses: list[dict]):
        self.responses = list(responses)
        self.requests: list[dict] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                endpoint.requests.append(
                    {"path": self.path, "body": body, "headers": {k.lower(): v for k, v in self.headers.items()}}
                )
                payload = json.dumps(endpoint.responses.pop(0)).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):  # /v1/models: what a client without a model name asks first
                payload = json.dumps({"object": "list", "data": [{"id": "scripted", "object": "model"}]}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def openai_reply(reasoning: str, content: str = "", calls: list[tuple[str, str, dict]] = ()) -> dict:
    message = {"role": "assistant", "content": content, "reasoning_content": reasoning}
    if calls:
        message["tool_calls"] = [
            {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
            for cid, name, args in calls
        ]
    return {
        "id": "x",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if calls else "stop"}],
    }


def anthropic_reply(reasoning: str, content: str = "", calls: list[tuple[str, str, dict]] = ()) -> dict:
    blocks = [{"type": "thinking", "thinking": reasoning, "signature": f"sig-{len(reasoning)}"}]
    if content:
        blocks.append({"type": "text", "text": content})
    blocks += [{"type": "tool_use", "id": cid, "name": name, "input": args} for cid, name, args in calls]
    return {
        "id": "m",
        "type": "message",
        "role": "assistant",
        "content": blocks,
        "stop_reason": "tool_use" if calls else "end_turn",
    }


# main: write + read, then delegate; sub-agent: run Python, answer; main: answer
SCRIPT = [
    (
        "main",
        "I will write the note, then read it back.",
        "",
        [("c1", "write_file", {"path": "notes.txt", "content": "hello"}), ("c2", "read_file", {"path": "notes.txt"})],
    ),
    (
        "main",
        "Counting is a separate job: delegate it.",
        "",
        [("c3", "delegate", {"task": "Count the characters of notes.txt with Python."})],
    ),
    ("sub", "Python can count them.", "", [("s1", "run_python", {"code": "print(len(open('notes.txt').read()))"})]),
    ("sub", "It printed 5.", "notes.txt has 5 characters.", []),
    ("main", "The sub-agent counted 5.", "Done: notes.txt says hello (5 characters).", []),
]


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_scripted_m2_conversation_sends_back_exactly_what_m2_expects(api, tmp_path):
    make = openai_reply if api == "openai" else anthropic_reply
    endpoint = ScriptedEndpoint([make(r, c, calls) for _, r, c, calls in SCRIPT])
    try:
        client = (OpenAIClient if api == "openai" else AnthropicClient)(endpoint.url, model="m2", api_key="k-1")
        transcript = tmp_path / "t.jsonl"
        work = tmp_path / "work"
        work.mkdir()
        result = Agent(client, workdir=str(work), transcript=str(transcript), max_steps=5).run(
            "Write hello to notes.txt and count it."
        )
    finally:
        endpoint.close()
    assert result.stopped == "answered" and result.answer == "Done: notes.txt says hello (5 characters)."
    assert (work / "notes.txt").read_text() == "hello"
    assert sorted(os.listdir(work)) == ["notes.txt"]  # the Python run left nothing behind
    bodies = [r["body"] for r in endpoint.requests]
    assert len(bodies) == 5
    replies = [make(r, c, calls) for _, r, c, calls in SCRIPT]

    if api == "openai":
        assert all(
            r["path"] == "/v1/chat/completions" and r["headers"]["authorization"] == "Bearer k-1"
            for r in endpoint.requests
        )

        def sent(reply):  # the assistant message as it must be appended: content, reasoning_content, tool_calls
            return {
                k: v
                for k, v in reply["choices"][0]["message"].items()
                if k in ("role", "content", "reasoning_content", "tool_calls")
            }

        system, task = bodies[0]["messages"]
        assert system["role"] == "system" and task == {
            "role": "user",
            "content": "Write hello to notes.txt and count it.",
        }
        assert bodies[1]["messages"] == [
            system,
            task,
            sent(replies[0]),
            {"role": "tool", "tool_call_id": "c1", "content": "wrote 5 characters to notes.txt"},
            {"role": "tool", "tool_call_id": "c2", "content": "hello"},
        ]
        sub_system, sub_task = bodies[2]["messages"]  # the sub-agent starts from a fresh context
        assert (
            "sub-agent" in sub_system["content"]
            and sub_task["content"] == "Count the characters of notes.txt with Python."
        )
        assert bodies[3]["messages"][:3] == [sub_system, sub_task, sent(replies[2])]
        python_result = bodies[3]["messages"][3]
        assert python_result["tool_call_id"] == "s1" and python_result["content"] == "[exit code 0]\nstdout:\n5"
        assert bodies[4]["messages"] == [
            *bodies[1]["messages"],
            sent(replies[1]),
            {"role": "tool", "tool_call_id": "c3", "content": "notes.txt has 5 characters."},
        ]
        tool_names = [[t["function"]["name"] for t in b["tools"]] for b in bodies]
    else:
        assert all(r["path"] == "/v1/messages" and r["headers"]["x-api-key"] == "k-1" for r in endpoint.requests)
        assert all(r["headers"]["anthropic-version"] == "2023-06-01" for r in endpoint.requests)
        task = {"role": "user", "content": "Write hello to notes.txt and count it."}
        assert bodies[0]["messages"] == [task] and "agent" in bodies[0]["system"]
        # the whole block list, thinking (with its signature) included, goes back unchanged
        assert bodies[1]["messages"] == [
            task,
            {"role": "assistant", "content": replies[0]["content"]},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "c1", "content": "wrote 5 characters to notes.txt"},
                    {"type": "tool_result", "tool_use_id": "c2", "content": "hello"},
                ],
            },
        ]
        assert "sub-agent" in bodies[2]["system"] and bodies[2]["messages"] == [
            {"role": "user", "content": "Count the characters of notes.txt with Python."}
        ]
        assert bodies[3]["messages"][1] == {"role": "assistant", "content": replies[2]["content"]}
        assert bodies[4]["messages"] == [
            *bodies[1]["messages"],
            {"role": "assistant", "content": replies[1]["content"]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "c3", "content": "notes.txt has 5 characters."}],
            },
        ]
        tool_names = [[t["name"] for t in b["tools"]] for b in bodies]
    assert "delegate" in tool_names[0] and "delegate" not in tool_names[2]  # sub-agents do not delegate further
    events = [json.loads(line) for line in transcript.read_text().splitlines()]
    assert [e["event"] for e in events if e["agent"] == "main/1"] == [
        "task",
        "thinking",
        "tool_call",
        "tool_result",
        "thinking",
        "final",
    ]
    assert [e["name"] for e in events if e["event"] == "tool_call"] == [
        "write_file",
        "read_file",
        "delegate",
        "run_python",
    ]
    assert events[-1] == {**events[-1], "agent": "main", "event": "final", "text": result.answer}


def test_inline_think_content_is_sent_back_unchanged(tmp_path):
    """Append-think servers put <think>...</think> in content; the client must return it verbatim."""
    first = {
        "choices": [
            {
                "message": {
                    "role": "assistant",
                    "content": "<think>\nlist it\n</think>\n\n",
                    "tool_calls": [
                        {"id": "a", "type": "function", "function": {"name": "list_files", "arguments": "{}"}}
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ]
    }
    second = {
        "choices": [
            {
                "message": {"role": "assistant", "content": "<think>\nempty\n</think>\n\nIt is empty."},
                "finish_reason": "stop",
            }
        ]
    }
    endpoint = ScriptedEndpoint([first, second])
    try:
        result = Agent(OpenAIClient(endpoint.url + "/v1"), workdir=str(tmp_path), max_steps=3, max_depth=0).run("ls")
    finally:
        endpoint.close()
    assert result.answer == "It is empty."
    assert endpoint.requests[0]["body"]["model"] == "scripted"  # no model given: the first one /v1/models lists
    assert endpoint.requests[1]["body"]["messages"][2] == {
        "role": "assistant",
        "content": "<think>\nlist it\n</think>\n\n",
        "tool_calls": first["choices"][0]["message"]["tool_calls"],
    }


def test_bad_arguments_and_unknown_tools_go_back_as_errors(tmp_path):
    bad = [
        ("b1", "write_file", {"path": "x.txt"}),
        ("b2", "read_file", {"path": 3}),
        ("b3", "nope", {}),
        ("b4", "read_file", {"path": "x", "extra": 1}),
    ]
    replies = [openai_reply("try", calls=bad), openai_reply("give up", "could not")]
    replies[0]["choices"][0]["message"]["tool_calls"].append(
        {"id": "b5", "type": "function", "function": {"name": "read_file", "arguments": "{oops"}}
    )
    endpoint = ScriptedEndpoint(replies)
    try:
        result = Agent(OpenAIClient(endpoint.url), workdir=str(tmp_path), max_steps=3).run("t")
    finally:
        endpoint.close()
    assert result.answer == "could not"
    errors = {m["tool_call_id"]: m["content"] for m in endpoint.requests[1]["body"]["messages"] if m["role"] == "tool"}
    assert errors["b1"] == "error: invalid arguments: missing required argument 'content'"
    assert errors["b2"] == "error: invalid arguments: path must be string, got int"
    assert errors["b3"].startswith("error: there is no tool named 'nope'")
    assert errors["b4"] == "error: invalid arguments: unexpected argument 'extra'"
    assert errors["b5"].startswith("error: the arguments are not valid JSON")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------------- confinement
@pytest.fixture
def workspace(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "secret.txt").write_text("keep")
    (work / "link").symlink_to(tmp_path)
    return Workspace(str(work), command_timeout=2)


def call(ws: Workspace, name: str, **arguments) -> str:
    tool = {t.name: t for t in default_tools(ws)}[name]
    try:
        return tool(arguments)
    except Exception as e:
        return f"error: {e}"


def test_paths_outside_the_work_directory_are_refused(workspace, tmp_path):
    for path in ("../secret.txt", str(tmp_path / "secret.txt"), "link/secret.txt", "/etc/passwd"):
        assert "outside the work directory" in call(workspace, "read_file", path=path)
        assert "outside the work directory" in call(workspace, "write_file", path=path, content="x")
        assert "outside the work directory" in call(workspace, "edit_file", path=path, old="keep", new="x")
    assert "outside the work directory" in call(workspace, "list_files", path="..")
    assert (tmp_path / "secret.txt").read_text() == "keep"
    assert call(workspace, "write_file", path="sub/new.txt", content="in") == "wrote 2 characters to sub/new.txt"
    assert call(workspace, "edit_file", path="sub/new.txt", old="in", new="ok").startswith("replaced 1")
    assert call(workspace, "read_file", path="sub/new.txt") == "ok"


def test_file_tools_follow_inside_symlinks_and_refuse_special_files(workspace, tmp_path):
    work = tmp_path / "work"
    (work / "docs").mkdir()
    (work / "docs" / "a.txt").write_text("alpha")
    (work / "alias").symlink_to("docs/a.txt")  # relative, stays inside
    (work / "absolute").symlink_to(work / "docs")  # absolute, under the work directory
    (work / "loop").symlink_to("loop")
    os.mkfifo(work / "fifo")
    assert call(workspace, "read_file", path="alias") == "alpha"
    assert call(workspace, "read_file", path="absolute/../docs/a.txt") == "alpha"
    assert call(workspace, "read_file", path=str(work / "docs" / "a.txt")) == "alpha"
    assert call(workspace, "write_file", path="absolute/b.txt", content="beta") == "wrote 4 characters to docs/b.txt"
    assert call(workspace, "list_files", path="docs") == "a.txt\nb.txt"
    assert call(workspace, "list_files") == "absolute\nalias\ndocs/\nfifo\nlink\nloop"
    assert "is not a file" in call(workspace, "read_file", path="fifo")  # and does not hang on the FIFO
    assert "is not a file" in call(workspace, "write_file", path="fifo", content="x")
    assert "is a directory" in call(workspace, "write_file", path="docs", content="x")
    assert "error" in call(workspace, "read_file", path="loop")
    assert "does not exist" in call(workspace, "read_file", path="docs/missing.txt")
    assert "outside the work directory" in call(workspace, "read_file", path="docs/../../secret.txt")


@pytest.mark.skipif(not sandbox_available(), reason="bubblewrap cannot run here")
def test_python_is_confined_and_time_limited(workspace, tmp_path):
    # the host's tmp_path is not in the sandbox: this lands in the sandbox's own /tmp, thrown away with it
    call(workspace, "run_python", code=f"open({str(tmp_path / 'secret.txt')!r}, 'w').write('gone')")
    out = call(workspace, "run_python", code="open('/etc/mmx-agent-test', 'w').write('gone')")
    assert out.startswith("[exit code 1]") and "PermissionError" in out  # the guard, before the read-only mount
    assert call(workspace, "run_python", code="while True: pass", timeout=1).startswith("[timed out]")
    assert call(workspace, "run_python", code="import socket").startswith("[exit code 1]")
    assert (tmp_path / "secret.txt").read_text() == "keep"


@pytest.mark.skipif(not sandbox_available(), reason="bubblewrap cannot run here")
def test_shell_is_confined_time_limited_and_offline(workspace, tmp_path):
    out = call(
        workspace,
        "run_shell",
        command=f"echo gone > {tmp_path / 'secret.txt'}; rm -f {tmp_path / 'secret.txt'}; echo x > inside.txt",
    )
    assert out.startswith("[exit code 0]")  # the host's tmp_path is not there: it wrote to the sandbox's own /tmp
    assert (tmp_path / "secret.txt").read_text() == "keep" and (tmp_path / "work" / "inside.txt").exists()
    assert call(workspace, "run_shell", command="while true; do :; done", timeout=1).startswith("[timed out]")
    offline = call(
        workspace,
        "run_shell",
        command="python3 -c \"import socket; socket.create_connection(('1.1.1.1', 80), timeout=2)\"",
    )
    assert "exit code 1" in offline and ("unreachable" in offline or "Errno" in offline)


def test_running_code_is_refused_without_bubblewrap_unless_unsafe(monkeypatch, tmp_path):
    monkeypatch.setattr(bwrap, "find", lambda: None)
    ws = Workspace(str(tmp_path))
    for name, arguments in (("run_shell", {"command": "true"}), ("run_python", {"code": "print(1)"})):
        refused = call(ws, name, **arguments)
        assert "running code is unavailable" in refused and "apt-get install bubblewrap" in refused
        assert "--unsafe-no-sandbox" in refused
    unsafe = Workspace(str(tmp_path), allow_unsandboxed=True)
    assert call(unsafe, "run_shell", command="echo hi") == "[exit code 0]\nstdout:\nhi"


def test_cli_unsafe_flag_reaches_the_workspace(monkeypatch, tmp_path):
    import argparse

    from mmx.cli import agent as agent_cli

    parser = argparse.ArgumentParser()
    agent_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["agent", "hi", "--workdir", str(tmp_path), "--unsafe-no-sandbox", "--quiet"])
    assert args.unsafe_no_sandbox and not parser.parse_args(["agent", "hi"]).unsafe_no_sandbox
    seen = {}

    class Stop(Exception):
        pass

    def capture(client, tools, workspace, **kwargs):
        seen["workspace"] = workspace
        raise Stop

    monkeypatch.setattr("mmx.agent.Agent", capture)
    with pytest.raises(Stop):
        agent_cli.run(args)
    assert seen["workspace"].allow_unsandboxed


def test_schema_validation():
    schema = {
        "type": "object",
        "properties": {
            "n": {"type": "integer", "minimum": 1},
            "mode": {"enum": ["a", "b"]},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["n"],
    }
    assert validate({"n": 2, "mode": "a", "tags": ["x"]}, schema) == []
    assert validate({"n": True}, schema) == ["n must be integer, got bool"]
    assert validate({"n": 0, "mode": "c", "tags": [1]}, schema) == [
        "n must be >= 1",
        "mode must be one of ['a', 'b']",
        "tags[0] must be string, got int",
    ]


# ---------------------------------------------------------------------------------------------------- a real server
class Recording(OpenAIClient):
    sent: ClassVar[list] = []

    def complete(self, messages, tools):
        self.sent.append(copy.deepcopy(messages))
        return super().complete(messages, tools)


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_agent_against_a_real_mmx_server(api, tiny_server, tmp_path):
    """mmx-tiny, served by a real `mmx serve` process, calls a custom calculator tool through the agent loop."""
    from mmx.tasks.arithmetic import calculate

    calculator = Tool(
        "calculator",
        "Evaluate an arithmetic expression with + - * / and parentheses.",
        {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "for example (12 + 30) * 4"}},
            "required": ["expression"],
        },
        lambda expression: calculate(expression),
    )
    name = "mmx-tiny"
    client = (Recording if api == "openai" else AnthropicClient)(
        tiny_server, model=name, max_tokens=192, temperature=0.0
    )
    if api == "openai":
        Recording.sent = []
    transcript = tmp_path / "t.jsonl"
    agent = Agent(
        client,
        workdir=str(tmp_path),
        tools=[calculator],
        max_steps=3,
        max_depth=0,
        transcript=str(transcript),
        system_prompt="You are mmx-tiny, a small model that solves arithmetic word problems step by step.",
    )
    result = agent.run(
        "Tom has 23 apples. Tom buys 4 bags with 12 apples in each. Tom gives away 17. How many apples does Tom have now?"
    )
    events = [json.loads(line) for line in transcript.read_text().splitlines()]
    calls = [e for e in events if e["event"] == "tool_call"]
    assert calls and calls[0]["name"] == "calculator"
    results = [e["text"] for e in events if e["event"] == "tool_result"]
    assert results[0] == calculate(calls[0]["arguments"]["expression"])
    assert result.stopped == "answered" and result.answer
    assert any(e["event"] == "thinking" for e in events)
    if api == "openai":  # the second request carried the first turn's reasoning back
        second = Recording.sent[1]
        assert second[2]["role"] == "assistant" and second[2]["reasoning_content"] and second[2]["tool_calls"]
