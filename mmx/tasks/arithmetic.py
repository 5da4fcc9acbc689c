"""Multi-step arithmetic word problems with a calculator tool: the task mmx-tiny is trained on, evaluated on and
reinforced on.

A problem is a short story of 2 to 4 operations on a count of things. Solved with the tool, the model reasons
about which operations the story describes, writes them as one expression, calls ``calculator`` and reports the
result. Solved without it, the model works the arithmetic out step by step in its reasoning. Everything here is
generated from a seed; answers are checked against exact integer arithmetic.
"""

from __future__ import annotations

import ast
import operator
import random
import re
from dataclasses import dataclass, field
from typing import Any

SYSTEM_PROMPT = "You are mmx-tiny, a small model that solves arithmetic word problems step by step."

CALCULATOR_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression with + - * / and parentheses.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "for example (12 + 30) * 4"}},
            "required": ["expression"],
        },
    },
}

NAMES = ["Tom", "Ana", "Li", "Sara", "Omar", "Mia", "Ravi", "Zoe", "Ben", "Kim", "Leo", "Nora", "Ivan", "Ada", "Sam"]
ITEMS = ["apples", "books", "coins", "stickers", "marbles", "pencils", "cards", "shells", "eggs", "cookies", "stamps"]


@dataclass
class Step:
    kind: str  # add, sub, boxes, mul, div
    sentence: str  # how the story tells it
    note: str  # how the reasoning restates it
    operands: tuple[int, ...]


@dataclass
class Problem:
    name: str
    item: str
    start: int
    steps: list[Step]
    answer: int
    expression: str
    question: str = ""
    values: list[int] = field(default_factory=list)  # running total after each step

    @property
    def messages_prompt(self) -> list[dict[str, Any]]:
        return [{"role": "user", "content": self.question}]


# ---------------------------------------------------------------------------------------------------- problems
def _step(rng: random.Random, total: int, name: str, item: str) -> tuple[Step, int]:
    kinds = ["add", "sub", "boxes", "mul", "div"]
    weights = [3, 3 if total > 2 else 0, 2, 1 if total <= 200 else 0, 1 if total >= 4 else 0]
    kind = rng.choices(kinds, weights)[0]
    if kind == "add":
        b = rng.randint(2, 99)
        verb = rng.choice([f"buys {b} more", f"finds {b} more", f"gets {b} more from a friend", f"wins {b} more"])
        return Step(kind, f"{name} {verb}.", f"{verb} {item}: add {b}", (b,)), total + b
    if kind == "sub":
        b = rng.randint(1, min(99, total - 1))
        verb = rng.choice([f"gives away {b}", f"loses {b}", f"sells {b}", f"uses {b}"])
        return Step(kind, f"{name} {verb}.", f"{verb} {item}: subtract {b}", (b,)), total - b
    if kind == "boxes":
        n, m = rng.randint(2, 9), rng.randint(2, 12)
        box = rng.choice(["boxes", "bags", "packs"])
        sentence = f"{name} buys {n} {box} with {m} {item} in each."
        return Step(kind, sentence, f"{n} {box} of {m}: add {n} * {m}", (n, m)), total + n * m
    if kind == "mul":
        k = rng.choice([2, 3])
        word = {2: "doubles", 3: "triples"}[k]
        return Step(kind, f"Then the number of {item} {word}.", f"it {word}: multiply by {k}", (k,)), total * k
    divisors = [k for k in (2, 3, 4, 5) if total % k == 0]
    if not divisors:  # no even split: add instead
        return _step_add_fallback(rng, total, name, item)
    k = rng.choice(divisors)
    sentence = f"{name} splits them equally into {k} piles and keeps one pile."
    return Step("div", sentence, f"keeps one of {k} equal piles: divide by {k}", (k,)), total // k


def _step_add_fallback(rng: random.Random, total: int, name: str, item: str) -> tuple[Step, int]:
    b = rng.randint(2, 99)
    return Step("add", f"{name} buys {b} more.", f"buys {b} more {item}: add {b}", (b,)), total + b


def _expression(start: int, steps: list[Step]) -> str:
    """One expression for the whole story, with parentheses only where precedence needs them."""
    expr, additive = str(start), False  # additive: the expression's top-level operator is + or -
    for s in steps:
        if s.kind == "add":
            expr, additive = f"{expr} + {s.operands[0]}", True
        elif s.kind == "sub":
            expr, additive = f"{expr} - {s.operands[0]}", True
        elif s.kind == "boxes":
            expr, additive = f"{expr} + {s.operands[0]} * {s.operands[1]}", True
        else:
            op = "*" if s.kind == "mul" else "/"
            expr, additive = f"{'(' + expr + ')' if additive else expr} {op} {s.operands[0]}", False
    return expr


def make_problem(rng: random.Random, min_steps: int = 2, max_steps: int = 4) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start = rng.randint(2, 99)
    total, steps, values = start, [], []
    for _ in range(rng.randint(min_steps, max_steps)):
        step, total = _step(rng, total, name, item)
        steps.append(step)
        values.append(total)
    ask = rng.choice([f"How many {item} does {name} have now?", f"How many {item} does {name} have at the end?"])
    question = " ".join([f"{name} has {start} {item}.", *(s.sentence for s in steps), ask])
    return Problem(name, item, start, steps, total, _expression(start, steps), question, values)


def make_problems(seed: int, count: int, exclude: set[str] | None = None, **kwargs: Any) -> list[Problem]:
    """``count`` distinct problems from ``seed`` whose questions are not in ``exclude`` (a held-out set)."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    problems = []
    while len(problems) < count:
        p = make_problem(rng, **kwargs)
        if p.question not in seen:
            seen.add(p.question)
            problems.append(p)
    return problems


# ---------------------------------------------------------------------------------------------------- solutions
def _arithmetic(step: Step, before: int, after: int) -> str:
    """The step worked out explicitly (the no-tool reasoning)."""
    ops = step.operands
    if step.kind == "add":
        return f"{before} + {ops[0]} = {after}"
    if step.kind == "sub":
        return f"{before} - {ops[0]} = {after}"
    if step.kind == "boxes":
        product = ops[0] * ops[1]
        return f"{ops[0]} * {ops[1]} = {product}, {before} + {product} = {after}"
    if step.kind == "mul":
        return f"{before} * {ops[0]} = {after}"
    return f"{before} / {ops[0]} = {after}"


def final_answer_text(problem: Problem, value: int | str) -> str:
    return f"{problem.name} has {value} {problem.item} now."


def solution_messages(problem: Problem, use_tool: bool, system: bool = True) -> list[dict[str, Any]]:
    """The reference conversation: what mmx-tiny learns to write (reasoning, tool call, answer)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM_PROMPT}] if system else []
    messages.append({"role": "user", "content": problem.question})
    lines = [f"{problem.name} starts with {problem.start} {problem.item}."]
    if use_tool:
        lines += [
            f"{problem.name} {s.note}." if s.kind in ("add", "sub") else f"{s.note.capitalize()}."
            for s in problem.steps
        ]
        lines.append(f"So the answer is {problem.expression}. I will use the calculator.")
        call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": problem.expression}}}
        messages += [
            {"role": "assistant", "reasoning_content": "\n".join(lines), "content": "", "tool_calls": [call]},
            {"role": "tool", "content": str(problem.answer)},
            {
                "role": "assistant",
                "reasoning_content": f"The calculator says {problem.answer}.",
                "content": final_answer_text(problem, problem.answer),
            },
        ]
    else:
        before = problem.start
        for step, after in zip(problem.steps, problem.values):
            lines.append(f"{step.note.split(':')[0].capitalize()}: {_arithmetic(step, before, after)}.")
            before = after
        lines.append(f"So the answer is {problem.answer}.")
        messages.append(
            {
                "role": "assistant",
                "reasoning_content": "\n".join(lines),
                "content": final_answer_text(problem, problem.answer),
            }
        )
    return messages


def sft_record(problem: Problem, use_tool: bool, system: bool = True) -> dict[str, Any]:
    record: dict[str, Any] = {"messages": solution_messages(problem, use_tool, system)}
    if use_tool:
        record["tools"] = [CALCULATOR_TOOL]
    return record


# ---------------------------------------------------------------------------------------------------- tool, grader
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
MAX_MAGNITUDE = 10**12


def calculate(expression: str) -> str:
    """The calculator tool: + - * / and parentheses on numbers, nothing else (no names, calls or attributes).
    Errors come back as text for the model to read."""
    if len(expression) > 200:
        return "error: expression too long"
    try:
        tree = ast.parse(expression.strip(), mode="eval")
        value = _evaluate(tree.body)
    except ZeroDivisionError:
        return "error: division by zero"
    except (SyntaxError, ValueError) as e:
        return f"error: {e.msg if isinstance(e, SyntaxError) else e}"
    if value == int(value):
        return str(int(value))
    return f"{value:.6g}"


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        value = _OPS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
        if abs(value) > MAX_MAGNITUDE:
            raise ValueError("number too large")
        return value
    raise ValueError("only numbers, + - * / and parentheses are allowed")


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_WORD = re.compile(r"[A-Za-z]+")


def mentioned(text: str | None, words: list[str]) -> set[str]:
    """Which of ``words`` (item or person names) occur in ``text`` as whole words."""
    found = set(_WORD.findall(text or ""))
    return {w for w in words if w in found}


def extract_answer(content: str | None) -> int | None:
    """The last number of the final answer text (None when there is none)."""
    if not content:
        return None
    found = _NUMBER.findall(content.replace(",", ""))
    if not found:
        return None
    value = float(found[-1])
    return int(value) if value == int(value) else None
