"""schemathesis (v4) against the live OpenAPI document of a real `mmx serve` of mmx-tiny behind an API key: every
operation and every test phase (examples, coverage, fuzzing, stateful) of schemathesis' own runner, a bounded
number of generated requests per operation, every default check but the ones named in EXCLUDED.

Slow (a minute or more of generation on CPU): run with ``pytest -m slow tests/test_openapi.py``."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import httpx
import pytest

pytest.importorskip("schemathesis")

from .helpers import serve

pytestmark = pytest.mark.slow

KEY = "sk-schemathesis"
MAX_EXAMPLES = 25  # per operation and phase
# Default checks that cannot apply, and why.
EXCLUDED = {
    # The server validates more than a JSON schema can say, so a schema-valid body can rightly be a 400: a prompt
    # must fit the context, rules across fields must hold (tool_choice naming a tool that is among the tools, a
    # thinking budget below max_tokens, at most one constraint on the reply, tool messages after tool calls),
    # free-form objects must be well formed (tool schemas, Anthropic blocks), and fields the server cannot honour
    # are refused whatever their type allows (conversation, background: true, reasoning efforts, ...).
    "positive_data_acceptance": "schema-valid requests can break rules a JSON schema cannot express",
}


@pytest.fixture(scope="module")
def served():
    from mmx.embedded import embedded_model_path

    path = embedded_model_path()
    if path is None:
        pytest.skip("the embedded mmx-tiny model is not installed")
    # a short context and few sequences per request bound what a valid request generates; "warning": thousands
    # of requests' access-log lines would fill the pipe the helper reads the server's output from
    flags = ("--api-key", KEY, "--max-sequences-per-request", "8", "--log-level", "warning")
    with serve(path, *flags, max_model_len=512, cache_gb=0.1) as url:
        yield url


def test_the_server_conforms_to_its_openapi_document(served, tmp_path):
    command = [
        os.path.join(os.path.dirname(sys.executable), "st"),
        "run",
        f"{served}/openapi.json",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--header",
        f"Authorization: Bearer {KEY}",
        "--exclude-checks",
        ",".join(EXCLUDED),
        "--request-timeout",
        "120",
        "--no-color",
    ]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=1500)
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-20000:]
    tested = re.search(r"Tested: (\d+)", report)
    assert tested and int(tested.group(1)) >= 13, report[-3000:]
    assert re.search(r"(\d+) generated, \1 passed", report), report[-3000:]
    # valid requests really generated (most generated bodies break one of the rules EXCLUDED names)
    metrics = httpx.get(f"{served}/metrics").text
    finished = [int(n) for n in re.findall(r'mmx_requests_finished_total\{endpoint="\w+"\} (\d+)', metrics)]
    assert sum(finished) > 0, metrics
