"""Small stand-ins for the Hub datasets the chat tasks read, written in each dataset's exact schema and repo layout.

`write_fixture(name, folder)` lays out a folder the way the Hub repo is laid out (config sub-folders, parquet files
named `<split>-00000-of-00001.parquet`, a README whose YAML declares the configs and features), so the same folder
serves as a local `path=` and, through `tests.hub_cache.populate_hub_cache`, as an offline Hub snapshot. The rows are
written for these tests; `rows=` replaces them (e.g. with a bad row).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HUB_IDS = {
    "smoltalk": "HuggingFaceTB/smol-smoltalk",
    "mmlu": "cais/mmlu",
    "gsm8k": "openai/gsm8k",
    "arc": "allenai/ai2_arc",
    "humaneval": "openai/openai_humaneval",
}


def _msgs(*turns: tuple[str, str]) -> list[dict]:
    return [{"content": content, "role": role} for role, content in turns]


SMOLTALK = {
    "train": [
        {
            "messages": _msgs(("user", "Give me a synonym for happy."), ("assistant", "Cheerful.")),
            "source": "smol-rewrite",
        },
        {
            "messages": _msgs(
                ("system", "You are a concise assistant."),
                ("user", "What is the boiling point of water at sea level?"),
                ("assistant", "100 °C (212 °F)."),
                ("user", "And at the top of Everest?"),
                ("assistant", "About 70 °C, because the air pressure is much lower."),
            ),
            "source": "smol-magpie-ultra",
        },
        {
            "messages": _msgs(
                ("user", "Write a haiku about rain."),
                ("assistant", "Soft rain on the roof\nthe garden drinks without haste\nevening smells of earth"),
            ),
            "source": "everyday-conversations",
        },
    ],
    "test": [
        {"messages": _msgs(("user", "Translate 'cat' to French."), ("assistant", "Chat.")), "source": "smol-rewrite"},
        {"messages": _msgs(("user", "Hi!"), ("assistant", "Hello! How can I help?")), "source": "everyday"},
    ],
}

GSM8K = {
    "train": [
        {
            "question": "A baker makes 24 muffins in the morning and 18 in the afternoon. She sells 30 of them. "
            "How many muffins are left?",
            "answer": "The baker makes 24 + 18 = <<24+18=42>>42 muffins.\n"
            "After selling, 42 - 30 = <<42-30=12>>12 muffins are left.\n#### 12",
        },
        {
            # starts with an annotation, two annotations side by side
            "question": "Tom buys 3 boxes of 12 pencils and 2 packs of 5 pens. How many items does he buy?",
            "answer": "<<3*12=36>><<2*5=10>>He buys 36 pencils and 10 pens, so 36 + 10 = <<36+10=46>>46 items.\n"
            "#### 46",
        },
        {
            # an annotation without "=", a decimal result, no annotation on the last line
            "question": "A rope 5 m long is cut into 2 equal pieces. How long is each piece?",
            "answer": "Each piece is 5 / 2 = <<5/2>>2.5 m long.\nThat is <<5/2=2.5>>2.5 m.\n#### 2.5",
        },
        {
            "question": "A school orders 25 boxes of 50 sheets. How many sheets is that?",
            "answer": "25 boxes hold 25 * 50 = <<25*50=1250>>1,250 sheets.\n#### 1,250",
        },
    ],
    "test": [
        {
            "question": "The temperature was 3 degrees and fell by 8 degrees. What is it now?",
            "answer": "It is now 3 - 8 = <<3-8=-5>>-5 degrees.\n#### -5",
        },
        {
            "question": "Mia reads 15 pages a day for 4 days. How many pages does she read?",
            "answer": "She reads 15 * 4 = <<15*4=60>>60 pages.\n#### 60",
        },
    ],
}

MMLU = {
    "test": [
        {
            "question": "What is the SI unit of force?",
            "subject": "high_school_physics",
            "choices": ["Joule", "Newton", "Watt", "Pascal"],
            "answer": 1,
        },
        {
            "question": "Which gas do plants take in for photosynthesis?",
            "subject": "high_school_biology",
            "choices": ["Oxygen", "Nitrogen", "Carbon dioxide", "Helium"],
            "answer": 2,
        },
        {
            "question": "2 + 2 * 3 = ?",
            "subject": "elementary_mathematics",
            "choices": ["8", "12", "10", "6"],
            "answer": 0,
        },
    ],
    "auxiliary_train": [
        {
            "question": "Where would you most likely find a penguin?",
            "subject": "",
            "choices": ["Desert", "Antarctica", "Rainforest", "Savanna"],
            "answer": 1,
        },
        {
            "question": "The author's tone in the passage is best described as",
            "subject": "",
            "choices": ["angry", "hopeful", "bored", "confused"],
            "answer": 1,
        },
        {
            "question": "Which of these is a mammal?",
            "subject": "",
            "choices": ["Shark", "Frog", "Whale", "Eagle"],
            "answer": 2,
        },
    ],
}

ARC = {
    "ARC-Easy": {
        "train": [
            {
                "id": "Mercury_0001",
                "question": "Which object reflects light?",
                "choices": {
                    "text": ["a mirror", "a shadow", "a hole", "a black cloth"],
                    "label": ["A", "B", "C", "D"],
                },
                "answerKey": "A",
            },
            {
                "id": "NYSEDREGENTS_0002",
                "question": "Which tool measures temperature?",
                "choices": {"text": ["ruler", "thermometer", "balance"], "label": ["1", "2", "3"]},
                "answerKey": "2",
            },
        ],
        "test": [
            {
                "id": "Mercury_0003",
                "question": "What do roots do for a plant?",
                "choices": {
                    "text": ["make seeds", "take in water", "make flowers", "catch light"],
                    "label": ["A", "B", "C", "D"],
                },
                "answerKey": "B",
            }
        ],
    },
    "ARC-Challenge": {
        "train": [
            {
                "id": "Mercury_1001",
                "question": "A student drops a ball. Which force pulls it to the ground?",
                "choices": {
                    "text": ["friction", "magnetism", "gravity", "tension", "buoyancy"],
                    "label": ["A", "B", "C", "D", "E"],
                },
                "answerKey": "C",
            }
        ],
        "test": [
            {
                "id": "Mercury_1002",
                "question": "Which change is chemical?",
                "choices": {
                    "text": ["ice melting", "paper burning", "glass breaking", "salt dissolving"],
                    "label": ["A", "B", "C", "D"],
                },
                "answerKey": "B",
            }
        ],
    },
}

HUMANEVAL = {
    "test": [
        {
            "task_id": "HumanEval/0",
            "prompt": 'from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """Sum of xs.\n    >>> '
            'total([1, 2])\n    3\n    """\n',
            "canonical_solution": "    return sum(xs)\n",
            "test": "def check(candidate):\n    assert candidate([1, 2, 3]) == 6\n    assert candidate([]) == 0\n",
            "entry_point": "total",
        },
        {
            "task_id": "HumanEval/1",
            "prompt": 'def shout(s: str) -> str:\n    """Upper-case s and add "!".\n    >>> shout("hi")\n    '
            '\'HI!\'\n    """\n',
            "canonical_solution": '    return s.upper() + "!"\n',
            "test": "def check(candidate):\n    assert candidate('a') == 'A!'\n",
            "entry_point": "shout",
        },
    ]
}

WORDS = ["strawberry", "apple", "banana", "mississippi", "cat", "rhythm", "bookkeeper", "queue", "zebra", "lullaby"]

_STR = pa.string()
_MESSAGES = pa.list_(pa.struct([("content", _STR), ("role", _STR)]))
_MC = pa.schema([("question", _STR), ("subject", _STR), ("choices", pa.list_(_STR)), ("answer", pa.int64())])
_ARC = pa.schema(
    [
        ("id", _STR),
        ("question", _STR),
        ("choices", pa.struct([("text", pa.list_(_STR)), ("label", pa.list_(_STR))])),
        ("answerKey", _STR),
    ]
)
_SCHEMAS = {
    "smoltalk": pa.schema([("messages", _MESSAGES), ("source", _STR)]),
    "gsm8k": pa.schema([("question", _STR), ("answer", _STR)]),
    "humaneval": pa.schema([(c, _STR) for c in ("task_id", "prompt", "canonical_solution", "test", "entry_point")]),
}

# The README's YAML features, as on each dataset card (class labels included).
_MC_FEATURES = """  - name: question
    dtype: string
  - name: subject
    dtype: string
  - name: choices
    sequence: string
  - name: answer
    dtype:
      class_label:
        names:
          '0': A
          '1': B
          '2': C
          '3': D
"""
_FEATURES = {
    "smoltalk": """  - name: messages
    list:
    - name: content
      dtype: string
    - name: role
      dtype: string
  - name: source
    dtype: string
""",
    "gsm8k": "  - name: question\n    dtype: string\n  - name: answer\n    dtype: string\n",
    "arc": """  - name: id
    dtype: string
  - name: question
    dtype: string
  - name: choices
    sequence:
    - name: text
      dtype: string
    - name: label
      dtype: string
  - name: answerKey
    dtype: string
""",
    "humaneval": "".join(
        f"  - name: {c}\n    dtype: string\n"
        for c in ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    ),
}


def _write_parquet(path: Path, rows: list[dict], schema: pa.Schema) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def _readme(folder: Path, configs: dict[str, tuple[str, dict[str, str]]]) -> None:
    """configs: name -> (YAML features, {split: file glob})."""
    info, files = [], []
    for name, (features, splits) in configs.items():
        info.append(f"- config_name: {name}\n  features:\n{features}")
        globs = "".join(f"  - split: {split}\n    path: {glob}\n" for split, glob in splits.items())
        files.append(f"- config_name: {name}\n  data_files:\n{globs}")
    text = "---\ndataset_info:\n" + "".join(info) + "configs:\n" + "".join(files) + "---\n"
    (folder / "README.md").write_text(text, encoding="utf-8")


def write_fixture(name: str, folder: str | os.PathLike, rows: dict | None = None) -> Path:
    """Write the fixture `name` into `folder` and return `folder`.

    Names: smoltalk, gsm8k, mmlu (config "all" with test and auxiliary_train, plus the separate auxiliary_train
    config whose rows are wrapped in a "train" struct, as on the Hub), arc (ARC-Easy and ARC-Challenge), humaneval,
    words (a word list file; returns the file), identity (a JSONL file; returns the file). `rows` replaces the rows:
    {split: [row, ...]} (arc: {config: {split: rows}}; words: a list of words; identity: a list of conversations).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if name == "words":
        file = folder / "words.txt"
        file.write_text("\n".join(rows if rows is not None else WORDS) + "\n", encoding="utf-8")
        return file
    if name == "identity":
        file = folder / "identity.jsonl"
        lines = [json.dumps(c, ensure_ascii=False) for c in (rows if rows is not None else _IDENTITY)]
        file.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return file
    if name == "smoltalk":
        data = rows if rows is not None else SMOLTALK
        for split, split_rows in data.items():
            _write_parquet(folder / "data" / f"{split}-00000-of-00001.parquet", split_rows, _SCHEMAS["smoltalk"])
        _readme(folder, {"default": (_FEATURES["smoltalk"], {s: f"data/{s}-*" for s in data})})
    elif name in ("gsm8k", "humaneval"):
        data = rows if rows is not None else (GSM8K if name == "gsm8k" else HUMANEVAL)
        config = "main" if name == "gsm8k" else "openai_humaneval"
        for split, split_rows in data.items():
            _write_parquet(folder / config / f"{split}-00000-of-00001.parquet", split_rows, _SCHEMAS[name])
        _readme(folder, {config: (_FEATURES[name], {s: f"{config}/{s}-*" for s in data})})
    elif name == "mmlu":
        data = rows if rows is not None else MMLU
        for split, split_rows in data.items():
            _write_parquet(folder / "all" / f"{split}-00000-of-00001.parquet", split_rows, _MC)
        configs = {"all": (_MC_FEATURES, {s: f"all/{s}-*" for s in data})}
        if "auxiliary_train" in data:
            wrapped = pa.schema([("train", pa.struct(list(_MC)))])
            aux = [{"train": row} for row in data["auxiliary_train"]]
            _write_parquet(folder / "auxiliary_train" / "train-00000-of-00001.parquet", aux, wrapped)
            aux_features = (
                "  - name: train\n    struct:\n    - name: answer\n      dtype: int64\n    - name: choices\n"
                "      sequence: string\n    - name: question\n      dtype: string\n    - name: subject\n"
                "      dtype: string\n"
            )
            configs["auxiliary_train"] = (aux_features, {"train": "auxiliary_train/train-*"})
        _readme(folder, configs)
    elif name == "arc":
        data = rows if rows is not None else ARC
        for config, splits in data.items():
            for split, split_rows in splits.items():
                _write_parquet(folder / config / f"{split}-00000-of-00001.parquet", split_rows, _ARC)
        _readme(folder, {c: (_FEATURES["arc"], {s: f"{c}/{s}-*" for s in splits}) for c, splits in data.items()})
    else:
        raise ValueError(f"unknown fixture {name!r}")
    return folder


_IDENTITY = [
    # nanochat's identity_conversations.jsonl format: a bare list of messages per line
    [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I'm Testbot."}],
    # the Hugging Face format: an object with "messages"
    {
        "messages": [
            {"role": "user", "content": "Who made you?"},
            {"role": "assistant", "content": "The test suite did."},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "Any time."},
        ]
    },
]
