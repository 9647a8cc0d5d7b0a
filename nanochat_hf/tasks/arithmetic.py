"""The project's own offline arithmetic task: questions answered with calculator tool calls, in GSM8K's style.

Each calculation is written out ("12 * 7 = "), computed by a python tool call whose output follows, and the reply
ends with "#### N" like a GSM8K solution, so a tiny model learns the tool-call format and the answer format without
downloading anything. Example i of the train split is drawn from `random.Random(i)`, of the test split from
`random.Random(10_000_000 + i)`; tool outputs are what Python prints for the expression.
"""

from __future__ import annotations

import random

import datasets
from datasets import Value

from .common import conversations_dataset, tool_call

TEST_SEED_OFFSET = 10_000_000
_OPS = {"+": ("+", "plus"), "-": ("-", "minus"), "*": ("*", "times")}
_ASK = (
    "What is {a} {sym} {b}?",
    "Compute {a} {sym} {b}.",
    "{a} {sym} {b} = ?",
    "Calculate {a} {word} {b}.",
    "Can you work out {a} {sym} {b}?",
    "what's {a} {word} {b}",
)
_NAMES = (
    ("Ana", "she"),
    ("Ben", "he"),
    ("Chen", "he"),
    ("Dara", "she"),
    ("Eli", "he"),
    ("Fatima", "she"),
    ("Goro", "he"),
    ("Hana", "she"),
    ("Ivan", "he"),
    ("Jade", "she"),
    ("Kofi", "he"),
    ("Lena", "she"),
)
_ITEMS = ("apples", "marbles", "stickers", "books", "pencils", "cookies", "cards", "stamps", "shells", "coins")


def _calc(a: int, op: str, b: int) -> tuple[dict, dict, int]:
    value = a + b if op == "+" else a - b if op == "-" else a * b
    call = {"role": "assistant", "tool_calls": [tool_call(f"{a}{op}{b}")]}
    return call, {"role": "tool", "content": str(value)}, value


def _single(rng: random.Random) -> list[dict]:
    op = rng.choice(tuple(_OPS))
    if op == "*":
        a, b = rng.randint(2, 999), rng.randint(2, 99)
    else:
        a, b = rng.randint(10, 9999), rng.randint(10, 9999)
        if op == "-" and b > a and rng.random() < 0.8:  # mostly non-negative, sometimes not
            a, b = b, a
    sym, word = _OPS[op]
    call, output, value = _calc(a, op, b)
    call["content"] = f"{a} {sym} {b} = "
    return [
        {"role": "user", "content": rng.choice(_ASK).format(a=a, b=b, sym=sym, word=word)},
        call,
        output,
        {"role": "assistant", "content": f"{value}\n#### {value}"},
    ]


def _two_step(rng: random.Random) -> list[dict]:
    (name, she), items = rng.choice(_NAMES), rng.choice(_ITEMS)
    kind = rng.randrange(4)
    a, b, c = rng.randint(2, 60), rng.randint(2, 12), rng.randint(2, 30)
    # (question, unit, (text, operands) of the first step, (text, operands given its result) of the second)
    if kind == 0:
        question = (
            f"{name} has {a} {items}. {she.capitalize()} buys {b} packs with {c} {items} in each. "
            f"How many {items} does {name} have now?"
        )
        unit, first = items, (f"The packs hold {b} * {c} = ", (b, "*", c))
        second = (f"{name} now has {a} + {{}} = ", lambda v: (a, "+", v))
    elif kind == 1:
        a = a + b  # never gives away more than there is
        question = (
            f"{name} had {a} {items} and gave {b} of them to a friend. Then {she} found {c} more. "
            f"How many {items} does {name} have?"
        )
        unit, first = items, (f"After giving some away: {a} - {b} = ", (a, "-", b))
        second = (f"After finding more: {{}} + {c} = ", lambda v: (v, "+", c))
    elif kind == 2:
        c = rng.randint(1, a * b)
        question = f"A box holds {a} {items}. There are {b} boxes, and {c} {items} are taken out. How many are left?"
        unit, first = items, (f"The boxes hold {a} * {b} = ", (a, "*", b))
        second = (f"Left: {{}} - {c} = ", lambda v: (v, "-", c))
    else:
        c = rng.randint(1, a * b)
        question = (
            f"{name} earns {a} dollars a day for {b} days and then spends {c} dollars. "
            f"How many dollars does {name} have left?"
        )
        unit, first = "dollars", (f"{name} earns {a} * {b} = ", (a, "*", b))
        second = (f"After spending: {{}} - {c} = ", lambda v: (v, "-", c))
    call1, output1, v1 = _calc(*first[1])
    call1["content"] = first[0]
    call2, output2, v2 = _calc(*second[1](v1))
    call2["content"] = f"{v1} {unit}.\n" + second[0].format(v1)
    final = {"role": "assistant", "content": f"{v2} {unit}.\n#### {v2}"}
    return [{"role": "user", "content": question}, call1, output1, call2, output2, final]


def arithmetic(split: str = "train", size: int = 1000) -> datasets.Dataset:
    """`size` arithmetic conversations (one or two calculator calls each); rows carry `answer` (the final number)."""
    if split not in ("train", "test"):
        raise ValueError(f"arithmetic: unknown split {split!r}; choose train or test")
    rows = []
    for i in range(size):
        rng = random.Random(i if split == "train" else TEST_SEED_OFFSET + i)
        messages = _single(rng) if rng.random() < 0.5 else _two_step(rng)
        rows.append({"messages": messages, "answer": messages[-1]["content"].rsplit("#### ", 1)[1]})
    return conversations_dataset(rows, {"answer": Value("string")})
