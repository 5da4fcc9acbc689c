"""Verifiable rewards: math answers (normalised, then numeric or sympy equivalence), code run against tests in the
sandbox, output format, and tool-use success. Users plug in their own as ``"module:function"`` or
``"path/to/file.py:function"``, called with (episode, record) and returning a float or (float, correct)."""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from collections.abc import Callable
from typing import Any

from mmx.sandbox import Limits
from mmx.sandbox.judge import run_tests
from mmx.tasks.episodes import Episode

RewardFunction = Callable[[Episode, dict[str, Any]], "float | tuple[float, bool]"]

# ---------------------------------------------------------------------------------------------------- math
_BOXED = re.compile(r"\\boxed\s*\{")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*\$?([^\n$]+?)\$?\s*(?:\.|$)", re.IGNORECASE | re.MULTILINE)
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
_SAFE_EXPRESSION = re.compile(r"^[0-9a-z+\-*/^().,\s]*$")
_ALLOWED_NAMES = {"sqrt", "pi", "e", "i", "x", "y", "z", "n", "k", "a", "b", "c", "log", "sin", "cos", "tan", "exp"}


def _boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...}, braces balanced."""
    found = None
    for match in _BOXED.finditer(text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                found = text[start:i]
                break
    return found


def extract_math_answer(text: str) -> str | None:
    """The final answer: the last \\boxed{}, else "the answer is ...", else the last number."""
    boxed = _boxed(text)
    if boxed is not None:
        return boxed
    said = _ANSWER_IS.findall(text)
    if said:
        return said[-1]
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalize_answer(answer: str) -> str:
    s = answer.strip().strip("$").strip()
    for old, new in (
        ("\\left", ""),
        ("\\right", ""),
        ("\\!", ""),
        ("\\,", ""),
        ("\\;", ""),
        ("dfrac", "frac"),
        ("tfrac", "frac"),
        ("^\\circ", ""),
        ("^{\\circ}", ""),
        ("\\%", ""),
        ("%", ""),
        ("\\$", ""),
        ("\\cdot", "*"),
        ("\\times", "*"),
        ("\\pi", "pi"),
        ("\\text{", "{"),
        ("\\mathrm{", "{"),
    ):
        s = s.replace(old, new)
    s = re.sub(r"(\d),(\d{3})", r"\1\2", s)  # 1,000 -> 1000
    s = s.rstrip(".").strip()
    s = re.sub(r"\\frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"(\1)/(\2)", s)
    s = re.sub(r"\\sqrt\s*\{([^{}]*)\}", r"sqrt(\1)", s)
    s = s.replace("{", "(").replace("}", ")").replace("\\", "")
    return re.sub(r"\s+", "", s).lower()


def _as_number(s: str) -> float | None:
    try:
        if "/" in s and re.fullmatch(r"-?\(?\d+(\.\d+)?\)?/\(?\d+(\.\d+)?\)?", s):
            num, den = s.replace("(", "").replace(")", "").split("/")
            return float(num) / float(den)
        return float(s)
    except (ValueError, ZeroDivisionError):
        return None


def _sympy_equal(a: str, b: str) -> bool:
    """Symbolic equality of two small expressions; only arithmetic, a few functions and single-letter variables
    are parsed (sympy evaluates what it parses, so nothing else is let through)."""
    for s in (a, b):
        if len(s) > 80 or not _SAFE_EXPRESSION.match(s):
            return False
        if set(re.findall(r"[a-z]+", s)) - _ALLOWED_NAMES:
            return False
    try:
        import sympy
        from sympy.parsing.sympy_parser import implicit_multiplication_application, parse_expr, standard_transformations

        transforms = (*standard_transformations, implicit_multiplication_application)
        left = parse_expr(a.replace("^", "**"), transformations=transforms, evaluate=True)
        right = parse_expr(b.replace("^", "**"), transformations=transforms, evaluate=True)
        return bool(sympy.simplify(left - right) == 0)
    except Exception:  # anything sympy cannot read is simply not equal
        return False


def math_equal(predicted: str | None, reference: str | int | float) -> bool:
    if predicted is None:
        return False
    a, b = normalize_answer(str(predicted)), normalize_answer(str(reference))
    if a == b:
        return True
    x, y = _as_number(a), _as_number(b)
    if x is not None and y is not None:
        return math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)
    return _sympy_equal(a, b)


def math_reward(episode: Episode, record: dict[str, Any]) -> tuple[float, bool]:
    correct = math_equal(extract_math_answer(episode.final_content), record["answer"])
    return float(correct), correct


# ---------------------------------------------------------------------------------------------------- code
_CODE_BLOCK = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)


def extract_code(text: str) -> str:
    blocks = _CODE_BLOCK.findall(text)
    return blocks[-1] if blocks else text


def code_reward(episode: Episode, record: dict[str, Any], limits: Limits | None = None) -> tuple[float, bool]:
    """1 when the response's code passes ``record["tests"]`` (Python asserts) in the sandbox, else 0. The verdict
    comes from the test harness after the last assert (:mod:`mmx.sandbox.judge`), never from the exit status or the
    output, so a submission that exits early, kills itself or patches builtins gets 0."""
    limits = limits or Limits(timeout=10, memory_mb=512)
    verdict = run_tests(extract_code(episode.final_content), record["tests"], limits)
    episode.metadata["sandbox"] = verdict.summary()
    return float(verdict.passed), verdict.passed


# ---------------------------------------------------------------------------------------------------- format and tools
def format_ok(episode: Episode) -> bool:
    """Every turn closed its reasoning, finished by itself (not at the length limit) and the answer is not empty."""
    if not episode.turns:
        return False
    closed = all("</think>" in t.text or t.calls for t in episode.turns)
    finished = all(t.finish_reason == "stop" for t in episode.turns)
    return closed and finished and bool(episode.final_content.strip())


def tool_use_success(episode: Episode, tool: str, correct: bool) -> bool:
    """The task was solved and the named tool was called without error along the way."""
    used = any(
        c["name"] == tool and not r.startswith("error") for t in episode.turns for c, r in zip(t.calls, t.results)
    )
    return correct and used


# ---------------------------------------------------------------------------------------------------- plug-ins
def load_reward_function(spec: str) -> RewardFunction:
    """``"package.module:function"`` or ``"path/to/file.py:function"``."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ValueError(f"reward {spec!r}: use 'module:function' or 'file.py:function'")
    if target.endswith(".py"):
        loader_spec = importlib.util.spec_from_file_location("mmx_user_reward", target)
        if loader_spec is None or loader_spec.loader is None:
            raise FileNotFoundError(f"reward file not found: {target}")
        module = importlib.util.module_from_spec(loader_spec)
        loader_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {target} has no function {name!r}")
    return fn
