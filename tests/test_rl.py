"""mmx rl end to end (two steps on the embedded mmx-tiny), rewards, tasks and plug-in reward functions."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mmx.embedded import embedded_model_path
from mmx.rl.config import RLConfig
from mmx.rl.rewards import code_reward, extract_math_answer, load_reward_function, math_equal, normalize_answer
from mmx.rl.tasks import ArithmeticTask, JsonlTask
from mmx.sandbox import Limits, sandbox_available
from mmx.sandbox.judge import run_tests
from mmx.tasks.episodes import Episode, Turn


def finished(content: str, reasoning: str = "thinking", calls=None, results=None) -> Episode:
    episode = Episode([{"role": "user", "content": "q"}], None)
    text = f"{reasoning}\n</think>\n\n{content}"
    episode.turns.append(Turn([1], [2, 3], text, reasoning, content, calls or [], results or [], [-0.1, -0.2], "stop"))
    return episode


@pytest.mark.parametrize(
    ("predicted", "reference", "equal"),
    [
        ("42", 42, True),
        ("1,000", "1000", True),
        ("\\frac{1}{2}", "0.5", True),
        ("\\dfrac{3}{4}", "3/4", True),
        ("2\\sqrt{2}", "sqrt(8)", True),
        ("x+1", "1+x", True),
        ("$90^\\circ$", "90", True),
        ("41", 42, False),
        ("x+2", "x+1", False),
        ("__import__('os').system('true')", "0", False),  # never handed to sympy
        (None, "1", False),
    ],
)
def test_math_equivalence(predicted, reference, equal):
    assert math_equal(predicted, reference) is equal


def test_answer_extraction():
    assert extract_math_answer("so \\boxed{\\frac{1}{2}} is it") == "\\frac{1}{2}"
    assert extract_math_answer("The answer is 17.") == "17"
    assert extract_math_answer("we get 3 then 12") == "12"
    assert normalize_answer("\\left( 1,234 \\right).") == "(1234)"


needs_sandbox = pytest.mark.skipif(not sandbox_available(), reason="bubblewrap cannot run here")
ADD_TESTS = "assert all([add(2, 3) == 5, add(-1, 1) == 0])\nassert add(0, 0) == 0\n"
WRONG = "def add(a, b):\n    return a - b\n"
# a wrong solution followed by each way of faking success; every one must get 0
FORGERIES = {
    "sys.exit(0)": WRONG + "import sys\nsys.exit(0)\n",
    "os._exit(0)": WRONG + "import os\nos._exit(0)\n",
    "raise SystemExit": WRONG + "raise SystemExit(0)\n",
    "exit inside a test": "def add(a, b):\n    import os\n    os._exit(0)\n",
    "kill own process group": WRONG + "import os, signal\nos.killpg(0, signal.SIGKILL)\n",
    "kill own process": WRONG + "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
    "patch AssertionError": WRONG + "import builtins\nbuiltins.AssertionError = type('Quiet', (Exception,), {})\n",
    "patch builtins the tests use": WRONG
    + "import builtins\nbuiltins.all = lambda *a: True\ndef all(*a):\n    return True\n",
    "fake success output": WRONG + "print('OK'); print('All tests passed'); print('passed')\n",
    "excepthook swallowing": WRONG + "import sys\nsys.excepthook = lambda *a: None\n",
    "read the nonce through frames": WRONG
    + "import sys\nv = list(sys._getframe(1).f_locals.values())\n"
    + "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, repr(v).encode())\n    except OSError:\n        pass\n",
    "guess the verdict fd": WRONG + "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'0' * 64)\n"
    "    except OSError:\n        pass\n",
}


@needs_sandbox
def test_code_reward_runs_tests_in_the_sandbox():
    good = finished("```python\ndef add(a, b):\n    return a + b\n```")
    slow = finished("```python\ndef add(a, b):\n    while True: pass\n```")
    assert code_reward(good, {"tests": ADD_TESTS}) == (1.0, True) and good.metadata["sandbox"] == "passed"
    assert code_reward(slow, {"tests": ADD_TESTS}, Limits(timeout=1)) == (0.0, False)
    assert slow.metadata["sandbox"] == "timed out"
    wrong = finished(f"```python\n{WRONG}```")
    assert code_reward(wrong, {"tests": ADD_TESTS}) == (0.0, False)
    assert wrong.metadata["sandbox"] == "failed: AssertionError"


@needs_sandbox
@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_code_reward_cannot_be_forged(forgery):
    episode = finished(f"```python\n{FORGERIES[forgery]}```")
    assert code_reward(episode, {"tests": ADD_TESTS}, Limits(timeout=5, memory_mb=512)) == (0.0, False)
    assert episode.metadata["sandbox"] != "passed"


@needs_sandbox
def test_a_right_solution_passes_with_output_logging_and_the_standard_library():
    solution = (
        "from collections import namedtuple\nfrom dataclasses import dataclass\nimport logging, typing\n"
        "Pair = namedtuple('Pair', 'a b')\n@dataclass\nclass Box:\n    v: int\nT = typing.TypeVar('T')\n"
        "logging.getLogger('x').warning('logged')\nprint('hello')\n"
        "def add(a, b):\n    return Box(Pair(a, b).a).v + b\n"
    )
    assert run_tests(solution, ADD_TESTS).passed
    with pytest.raises(ValueError, match="tests do not compile"):
        run_tests(solution, "assert (")


def test_jsonl_task_with_builtin_and_custom_rewards(tmp_path):
    data = tmp_path / "tasks.jsonl"
    data.write_text(
        json.dumps({"prompt": "2+2?", "answer": "4"})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "x"}], "answer": "5"})
        + "\n"
    )
    task = JsonlTask(str(data))
    import random

    episodes = task.sample(random.Random(0), 4)
    assert all(e.messages[-1]["role"] == "user" for e in episodes)
    right = finished("It is \\boxed{4}.")
    right.metadata["record"] = {"answer": "4"}
    assert task.score(right).correct
    plugin = tmp_path / "my_reward.py"
    plugin.write_text("def score(episode, record):\n    return (0.5, 'please' in episode.final_content)\n")
    custom = JsonlTask(str(data), reward=f"{plugin}:score")
    polite = finished("please")
    polite.metadata["record"] = {"answer": "4"}
    score = custom.score(polite)
    assert score.reward == 0.5 and score.correct
    with pytest.raises(ValueError, match="has no function 'nope'"):
        load_reward_function(f"{plugin}:nope")


def test_arithmetic_task_never_trains_on_its_held_out_problems():
    import random

    task = ArithmeticTask(use_tools=True)
    held_out = {e.messages[-1]["content"] for e in task.eval_episodes(500)}
    sampled = task.sample(random.Random(0), 300)
    assert not held_out & {e.messages[-1]["content"] for e in sampled}
    assert all(e.tools and e.tools[0]["function"]["name"] == "calculator" for e in sampled)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="'loss'"):
        RLConfig(loss="ppo")
    with pytest.raises(ValueError, match="unknown rl config key 'group'"):
        RLConfig.from_dict({"group": 4})


@pytest.mark.skipif(embedded_model_path() is None, reason="the embedded mmx-tiny model is not installed")
def test_two_step_rl_run(tmp_path):
    out = tmp_path / "rl"
    cmd = [
        sys.executable,
        "-m",
        "mmx.cli.main",
        "rl",
        "--steps",
        "2",
        "--group-size",
        "2",
        "--prompts-per-step",
        "2",
        "--minibatches",
        "2",
        "--max-tokens",
        "64",
        "--eval-problems",
        "2",
        "--eval-every",
        "2",
        "--out-dir",
        str(out),
        "--loss",
        "cispo",
        "--progress",
        "false",
        "--lr",
        "1e-4",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    first = records[1]
    for key in (
        "reward",
        "accuracy",
        "entropy",
        "response_length",
        "clipped_fraction",
        "prob_correlation",
        "groups_kept",
    ):
        assert key in first, key
    # the sampler's log-probs are the trainer's, token for token, at every step: the rollouts of step 2 reuse no
    # prefix that step 1's weights computed (the trainer resets the engine's prefix cache after each update)
    assert all(r["prob_correlation"] > 0.999 for r in records[1:]), [r["prob_correlation"] for r in records[1:]]
    assert "eval_accuracy" in records[2]
    assert (out / "checkpoint-2" / "model.safetensors").exists() and (out / "rl.png").exists()
    import mmx

    mmx.load_model(out / "checkpoint-2")
