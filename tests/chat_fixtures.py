"""Hand-written conversations shared by the midtraining, SFT and RL tests: plain turns, a system prompt, and
calculator tool calls in the shapes the tasks produce (arguments as a mapping and as a JSON string)."""

import json


def tool_conversation(i: int, json_arguments: bool = False) -> list[dict]:
    a, b = 3 + i, 7 * i + 1
    arguments = {"code": f"{a}*{b}"}
    call = {"type": "function", "function": {"name": "python",
                                             "arguments": json.dumps(arguments) if json_arguments else arguments}}
    return [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": f"What is {a} times {b}?"},
        {"role": "assistant", "content": "Let me compute that.", "tool_calls": [call]},
        {"role": "tool", "content": str(a * b)},
        {"role": "assistant", "content": f"It is {a * b}.\n#### {a * b}"},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome."},
    ]


def plain_conversation(i: int) -> list[dict]:
    return [
        {"role": "user", "content": f"Say the number {i} in words, please."},
        {"role": "assistant", "content": f"The number is {i}; " + "really " * (i % 5) + "that one."},
    ]


def conversations(n: int = 48, json_arguments: bool = False) -> list[dict]:
    """Every third conversation is plain, the others call the calculator. One dataset holds one shape of tool-call
    arguments (Arrow columns have one type)."""
    return [{"messages": plain_conversation(i) if i % 3 == 0 else tool_conversation(i, json_arguments)}
            for i in range(n)]


def write_jsonl(path, rows: list[dict]) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)
