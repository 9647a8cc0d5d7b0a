"""Chat tasks: every dataset loads from a local copy or the offline Hub cache in the Hub's schema, conversations follow
the rules (bad rows fail naming dataset, row and rule), GSM8K's calculator calls render exactly as nanochat renders
them, the generators are deterministic and correct, and the mixtures have nanochat's composition."""

from __future__ import annotations

import json
import re

import datasets
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanochat_hf.tasks import (
    TASK_NAMES,
    ConversationError,
    build_mixture,
    extract_answer,
    gsm8k_reward,
    load_task,
    mixture_parts,
    validate_messages,
)
from nanochat_hf.tasks.spelling import embedded_words

from .hub_cache import populate_hub_cache
from .nanochat_reference import render_conversation as nanochat_render
from .task_fixtures import ARC, GSM8K, HUB_IDS, HUMANEVAL, MMLU, SMOLTALK, WORDS, write_fixture


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("task_fixtures")
    paths = {name: write_fixture(name, root / name) for name in (*HUB_IDS, "words", "identity")}
    return paths


@pytest.fixture(scope="module")
def tok(tiny_checkpoint):
    return AutoTokenizer.from_pretrained(tiny_checkpoint)


# ---------------------------------------------------------------------------------------------------------------
# nanochat's rendering, restated from nanochat-spec.md §3.1 and §4.6 (GSM8K), independent of the chat template


def nanochat_gsm8k_conversation(question: str, answer: str) -> list[dict]:
    """The conversation nanochat's GSM8K task builds: the answer split on <<expr=result>> into text, python and
    python_output parts (empty text parts included, as nanochat keeps them)."""
    parts = []
    for piece in re.split(r"(<<[^>]+>>)", answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            inner = piece[2:-2]
            expr, result = inner.rsplit("=", 1) if "=" in inner else (inner, "")
            parts += [{"type": "python", "text": expr}, {"type": "python_output", "text": result}]
        else:
            parts.append({"type": "text", "text": piece})
    return [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]


def template_render(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return out["input_ids"], out["assistant_masks"]


def as_nanochat_parts(messages: list[dict]) -> list[dict]:
    """Fold Hugging Face tool calls back into nanochat's one-turn parts (for the generated tasks)."""
    out = []
    for m in messages:
        if m["role"] in ("system", "user"):
            out.append({"role": m["role"], "content": m["content"]})
            continue
        if m["role"] == "assistant" and (not out or out[-1]["role"] != "assistant"):
            out.append({"role": "assistant", "content": []})
        parts = out[-1]["content"]
        if m["role"] == "tool":
            parts.append({"type": "python_output", "text": m["content"]})
            continue
        if parts and parts[-1]["type"] == "text":  # consecutive texts are one string in the template's render
            parts[-1]["text"] += m["content"]
        else:
            parts.append({"type": "text", "text": m["content"]})
        for call in m["tool_calls"] or []:
            parts.append({"type": "python", "text": call["function"]["arguments"]["code"]})
    return out


# ---------------------------------------------------------------------------------------------------------------
# GSM8K


@pytest.mark.parametrize("split", ["train", "test"])
def test_gsm8k_renders_like_nanochat(fixtures, tok, split):
    ds = load_task("gsm8k", split, path=fixtures["gsm8k"])
    assert len(ds) == len(GSM8K[split])
    for row, source in zip(ds, GSM8K[split], strict=True):
        expected = nanochat_render(tok, nanochat_gsm8k_conversation(source["question"], source["answer"]))
        assert template_render(tok, row["messages"]) == expected
        assert row["answer"] == source["answer"].rsplit("#### ", 1)[1].replace(",", "")


def test_trl_sft_labels_follow_nanochats_mask(fixtures, tok, tiny_checkpoint, tmp_path):
    """TRL's own SFT preparation (assistant_only_loss) trains exactly the tokens nanochat trains on."""
    trl = pytest.importorskip("trl")
    ds = load_task("gsm8k", path=fixtures["gsm8k"])
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"), assistant_only_loss=True, use_cpu=True, bf16=False, report_to=[]
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    for prepared, source in zip(trainer.train_dataset, GSM8K["train"], strict=True):
        ids, mask = nanochat_render(tok, nanochat_gsm8k_conversation(source["question"], source["answer"]))
        assert prepared["input_ids"] == ids
        assert prepared["labels"] == [t if m else -100 for t, m in zip(ids, mask, strict=True)]


def test_gsm8k_tool_calls(fixtures):
    row = load_task("gsm8k", path=fixtures["gsm8k"])[1]  # starts with two annotations side by side
    roles = [m["role"] for m in row["messages"]]
    assert roles == ["user", "assistant", "tool", "assistant", "tool", "assistant", "tool", "assistant"]
    codes = [m["tool_calls"][0]["function"]["arguments"]["code"] for m in row["messages"] if m["tool_calls"]]
    assert codes == ["3*12", "2*5", "36+10"]
    assert [m["content"] for m in row["messages"] if m["role"] == "tool"] == ["36", "10", "46"]
    assert row["messages"][-1]["content"].endswith("#### 46")
    no_result = load_task("gsm8k", path=fixtures["gsm8k"])[2]["messages"]
    assert no_result[1]["tool_calls"][0]["function"]["arguments"]["code"] == "5/2" and no_result[2]["content"] == ""


def test_gsm8k_answer_extraction_and_reward():
    assert extract_answer("so the answer is\n#### 1,250") == "1250"
    assert extract_answer("#### -5 degrees") == "-5"
    assert extract_answer("no marker 42") is None
    assert gsm8k_reward("I think\n#### 1,250", "1250") == 1.0
    assert gsm8k_reward("#### 1250", "Total.\n#### 1,250") == 1.0  # a full reference solution works too
    assert gsm8k_reward("#### 12", "13") == 0.0
    assert gsm8k_reward("The answer is 12", "12") == 0.0  # nanochat needs the #### marker
    assert gsm8k_reward("#### 2.50", "2.5") == 0.0  # exact string match, as in nanochat


# ---------------------------------------------------------------------------------------------------------------
# The other Hub datasets, from a local copy


def test_smoltalk(fixtures, tok):
    for split in ("train", "test"):
        ds = load_task("smoltalk", split, path=fixtures["smoltalk"])
        assert [[(m["role"], m["content"]) for m in r["messages"]] for r in ds] == [
            [(m["role"], m["content"]) for m in r["messages"]] for r in SMOLTALK[split]
        ]
    system_row = load_task("smoltalk", path=fixtures["smoltalk"])[1]["messages"]
    assert template_render(tok, system_row) == nanochat_render(tok, system_row)


def test_mmlu(fixtures):
    test = load_task("mmlu", "test", path=fixtures["mmlu"])
    row, source = test[0], MMLU["test"][0]
    assert row["messages"][0]["content"] == (
        "Multiple Choice question: What is the SI unit of force?\n- Joule=A\n- Newton=B\n- Watt=C\n- Pascal=D\n"
        "\nRespond only with the letter of the correct answer."
    )
    assert row["messages"][1]["content"] == row["answer"] == "B"
    assert row["letters"] == ["A", "B", "C", "D"] and row["subject"] == source["subject"]
    aux = load_task("mmlu", "auxiliary_train", path=fixtures["mmlu"])
    assert [r["answer"] for r in aux] == ["ABCD"[r["answer"]] for r in MMLU["auxiliary_train"]]
    assert load_task("mmlu", "train", path=fixtures["mmlu"])["messages"] == aux["messages"]
    # A copy of the Hub's separate auxiliary_train config: rows wrapped in a "train" struct.
    wrapped = load_task("mmlu", "auxiliary_train", path=fixtures["mmlu"] / "auxiliary_train")
    assert wrapped["messages"] == aux["messages"]


@pytest.mark.parametrize(("name", "config"), [("arc_easy", "ARC-Easy"), ("arc_challenge", "ARC-Challenge")])
def test_arc(fixtures, name, config):
    for split in ("train", "test"):
        ds = load_task(name, split, path=fixtures["arc"])
        for row, source in zip(ds, ARC[config][split], strict=True):
            assert row["letters"] == source["choices"]["label"] and row["answer"] == source["answerKey"]
            assert row["messages"][1]["content"] == source["answerKey"]
            for text, letter in zip(source["choices"]["text"], source["choices"]["label"], strict=True):
                assert f"\n- {text}={letter}\n" in row["messages"][0]["content"]


def test_humaneval(fixtures, tmp_path):
    import subprocess
    import sys

    ds = load_task("humaneval", "test", path=fixtures["humaneval"])
    for row, source in zip(ds, HUMANEVAL["test"], strict=True):
        assert row["messages"][0]["content"] == source["prompt"]
        assert row["messages"][1]["content"] == source["prompt"] + "\n" + source["canonical_solution"]
        # The reference reply passes the task's own tests, run the way nanochat scores HumanEval.
        program = row["messages"][1]["content"] + "\n\n" + row["test"] + f"\ncheck({row['entry_point']})\n"
        (tmp_path / "prog.py").write_text(program)
        assert subprocess.run([sys.executable, str(tmp_path / "prog.py")], timeout=30).returncode == 0


# nanochat HEAD's tasks/humaneval.py rule (nanochat-spec.md §5.3): the first block opened by ``` or ```python, then
# optional whitespace, a newline, and closed by a newline and ```; else the whole reply; stripped either way. Each
# expected value below is what nanochat's own extract_program returned for the input (run from /work/nanochat).
HUMANEVAL_EXTRACTION = [
    ("```python\ndef f():\n    return 1\n```", "def f():\n    return 1"),
    ("```\nx = 1\n```", "x = 1"),
    ("Sure:\n```python\na = 1\n```\nor\n```python\nb = 2\n```\n", "a = 1"),  # the first of several blocks
    ("  def f(): pass  \n", "def f(): pass"),  # no fence: the whole reply, stripped
    ("```python\ndef f():\n    return 1", "```python\ndef f():\n    return 1"),  # unterminated: the whole reply
    ("```py\nx = 1\n```", "```py\nx = 1\n```"),  # only "python" or nothing may follow the fence
    ("```Python\nx = 1\n```", "```Python\nx = 1\n```"),  # case-sensitive
    ("```python3\nx = 1\n```", "```python3\nx = 1\n```"),
    ("```python\nx = 1```", "```python\nx = 1```"),  # the closing fence must start a line
    ("```python   \n x = 1\n```", "x = 1"),  # spaces after the tag; the block is stripped
    ("```python\n    return 1\n```", "return 1"),  # stripping takes the first line's indentation too
    ("```python\r\nx = 1\r\n```", "x = 1"),
    ("text ```python\nz = 3\n``` more", "z = 3"),  # the fences need not start a line
    ("```\n```\n```python\nx = 1\n```", "```"),  # an empty block's closing fence ends the first match late
    ("```py\nx = 1\n```\n```python\ny = 2\n```", "```python\ny = 2"),  # a closing fence can open the match
]


@pytest.mark.parametrize(("completion", "program"), HUMANEVAL_EXTRACTION)
def test_humaneval_takes_the_first_code_block_as_nanochat(completion, program):
    from nanochat_hf.tasks.humaneval import extract_program

    assert extract_program(completion) == program


def test_humaneval_program_is_nanochats():
    from nanochat_hf.tasks.humaneval import humaneval_program, prompt_imports

    prompt = "from typing import List\n# a comment\n\nimport os\n\ndef f(xs):\n    import sys\n"
    assert prompt_imports(prompt) == "from typing import List\nimport os"  # up to the first other line
    assert prompt_imports("x = 1\nimport os\n") == ""
    assert prompt_imports("import a\u2028b\nimport c\n") == "import a\u2028b\nimport c"  # lines end at \n only
    row = {"prompt": prompt, "test": "def check(c):\n    assert c([]) == 0\n", "entry_point": "f"}
    assert humaneval_program(row, "Here:\n```python\ndef f(xs):\n    return 0\n```\nDone.") == (
        "from typing import List\nimport os\n\ndef f(xs):\n    return 0\n\ndef check(c):\n    assert c([]) == 0\n"
        "\ncheck(f)")


def test_local_single_file_and_jsonl(tmp_path):
    rows = [{"question": "1+1?", "answer": "1 + 1 = <<1+1=2>>2\n#### 2"}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_task("gsm8k", "train", path=tmp_path)[0]["answer"] == "2"
    assert load_task("gsm8k", "test", path=tmp_path / "train.jsonl")[0]["answer"] == "2"  # a file is the split


# ---------------------------------------------------------------------------------------------------------------
# By Hub id, offline, from the Hub cache


@pytest.fixture
def offline_hub(tmp_path, monkeypatch, fixtures):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    for name, repo_id in HUB_IDS.items():
        populate_hub_cache(fixtures[name], repo_id, cache, repo_type="dataset")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_ids_from_offline_cache(fixtures, offline_hub):
    for name, split in [("smoltalk", "test"), ("mmlu", "test"), ("gsm8k", "train"), ("arc_challenge", "train")]:
        local = {"arc_challenge": "arc"}.get(name, name)
        assert load_task(name, split)["messages"] == load_task(name, split, path=fixtures[local])["messages"]
    assert load_task("humaneval", "test")["entry_point"] == ["total", "shout"]


def test_hub_id_not_cached_offline(offline_hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="openai/gsm8k: offline .* `hf download openai/gsm8k --repo-type dataset`"):
        load_task("gsm8k")


# ---------------------------------------------------------------------------------------------------------------
# Rules and errors


def _smoltalk_with(tmp_path, messages: list[dict]):
    good = SMOLTALK["train"][0]
    rows = {"train": [good, good, {"messages": messages, "source": "bad"}]}
    return write_fixture("smoltalk", tmp_path / "bad", rows=rows)


@pytest.mark.parametrize(
    ("messages", "rule"),
    [
        ([("assistant", "hi"), ("user", "hello")], "message 0: the conversation must start with a user message"),
        ([("user", "a"), ("user", "b"), ("assistant", "c")], "message 1: two user messages in a row"),
        ([("user", "a"), ("assistant", "b"), ("assistant", "c")], "message 2: two assistant messages in a row"),
        ([("user", "a"), ("assistant", "  ")], "message 1: empty assistant content"),
        ([("user", ""), ("assistant", "b")], "message 0: empty user content"),
        ([("user", "a"), ("robot", "b")], "message 1: unknown role 'robot'"),
        (
            [("user", "a"), ("assistant", "b"), ("system", "c")],
            "message 2: a system message is only allowed as the first message",
        ),
        ([("user", "a")], "ends with a user message|no assistant reply"),
        ([("user", "a"), ("tool", "42"), ("assistant", "b")], "message 1: a tool output without a call"),
    ],
)
def test_bad_smoltalk_rows_name_dataset_row_and_rule(tmp_path, messages, rule):
    folder = _smoltalk_with(tmp_path, [{"role": r, "content": c} for r, c in messages])
    with pytest.raises(ConversationError, match=f"smoltalk row 2[:,] .*{rule}|smoltalk row 2: .*{rule}"):
        load_task("smoltalk", path=folder)


def test_validate_messages_tool_rules():
    def call(code):
        return {"type": "function", "function": {"name": "python", "arguments": {"code": code}}}

    user = {"role": "user", "content": "2+2?"}
    ok = [user, {"role": "assistant", "content": "", "tool_calls": [call("2+2")]}, {"role": "tool", "content": "4"}]
    validate_messages(ok, "x", 0)
    validate_messages([*ok, {"role": "assistant", "content": "4"}], "x", 0)
    cases = [
        ([*ok, {"role": "tool", "content": "4"}], "x row 3, message 3: a tool output without a call"),
        ([user, {"role": "assistant", "content": "", "tool_calls": [call("1")]}], "ends with a tool call"),
        ([user, {"role": "assistant", "content": "", "tool_calls": [call("1")]}, user], "after a tool call"),
        ([user, {"role": "assistant", "content": ""}], "message 1: empty assistant content"),
        ([{"role": "user", "content": None}, {"role": "assistant", "content": "b"}], "must be a string"),
        ([{"role": "user", "content": "a", "tool_calls": [call("1")]}], "only assistant messages may have"),
        ([user, {"role": "assistant", "tool_calls": [{"function": {}}]}], "tool call 0 has no function name"),
        ([], "non-empty list"),
    ]
    for messages, rule in cases:
        with pytest.raises(ConversationError, match=re.escape(rule) if "row" in rule else rule):
            validate_messages(messages, "x", 3)


def test_bad_source_rows(tmp_path):
    gsm = write_fixture("gsm8k", tmp_path / "g", rows={"train": [{"question": "q", "answer": "no final line"}]})
    with pytest.raises(ConversationError, match="gsm8k row 0: the answer has no final '#### <number>' line"):
        load_task("gsm8k", path=gsm)
    bad_mc = dict(MMLU["test"][0], answer=7)
    mmlu = write_fixture("mmlu", tmp_path / "m", rows={"test": [MMLU["test"][0], bad_mc]})
    with pytest.raises(ConversationError, match="mmlu row 1: answer must be a choice index 0-3, got 7"):
        load_task("mmlu", "test", path=mmlu)
    bad_arc = dict(ARC["ARC-Easy"]["train"][0], answerKey="Z")
    arc = write_fixture("arc", tmp_path / "a", rows={"ARC-Easy": {"train": [bad_arc]}})
    with pytest.raises(ConversationError, match="arc_easy row 0: answerKey 'Z' is not one of the labels"):
        load_task("arc_easy", path=arc)


def test_load_errors(tmp_path, fixtures):
    with pytest.raises(ValueError, match="unknown task 'gsm9k'; choose one of smoltalk"):
        load_task("gsm9k")
    with pytest.raises(ValueError, match="gsm8k: unknown split 'validation'; choose one of train, test"):
        load_task("gsm8k", "validation", path=fixtures["gsm8k"])
    with pytest.raises(ValueError, match="humaneval: unknown split 'train'"):
        load_task("humaneval", path=fixtures["humaneval"])
    with pytest.raises(FileNotFoundError, match="no files for split 'test' .* data files found: .*train-00000"):
        load_task("smoltalk", "test", path=write_fixture("smoltalk", tmp_path / "s", rows={"train": []}))
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_task("gsm8k", path=tmp_path / "missing")
    (tmp_path / "wrong").mkdir()
    (tmp_path / "wrong" / "train.jsonl").write_text(json.dumps({"q": "x", "a": "y"}) + "\n")
    with pytest.raises(ValueError, match=r"gsm8k .*missing column\(s\) \['question', 'answer'\]; found \['q', 'a'\]"):
        load_task("gsm8k", path=tmp_path / "wrong")
    with pytest.raises(ValueError, match="size= applies only to the generated tasks"):
        load_task("gsm8k", size=3)
    with pytest.raises(ValueError, match="arithmetic: generated by the project, it reads no file"):
        load_task("arithmetic", path="x")


# ---------------------------------------------------------------------------------------------------------------
# Identity


def test_identity_default_and_custom(fixtures, tok):
    default = load_task("identity")
    assert len(default) >= 40
    assert any("nanochat-hf" in m["content"] for row in default for m in row["messages"])
    for row in default:
        template_render(tok, row["messages"])
    custom = load_task("identity", path=fixtures["identity"])
    assert [[m["content"] for m in r["messages"]] for r in custom] == [
        ["Who are you?", "I'm Testbot."],
        ["Who made you?", "The test suite did.", "Thanks", "Any time."],
    ]


def test_identity_errors(tmp_path):
    file = write_fixture("identity", tmp_path, rows=[[{"role": "user", "content": "hi"}]])
    with pytest.raises(ConversationError, match=r"identity .*identity.jsonl line row 1: .*no assistant reply"):
        load_task("identity", path=file)
    file.write_text('[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]\n{not json\n')
    with pytest.raises(ConversationError, match="identity.jsonl line 2: invalid JSON"):
        load_task("identity", path=file)
    with pytest.raises(FileNotFoundError, match="identity: no such file"):
        load_task("identity", path=tmp_path / "nope.jsonl")


# ---------------------------------------------------------------------------------------------------------------
# Generated tasks


def _tool_pairs(messages: list[dict]) -> list[tuple[str, str]]:
    calls = [m["tool_calls"][0]["function"]["arguments"]["code"] for m in messages if m["tool_calls"]]
    outputs = [m["content"] for m in messages if m["role"] == "tool"]
    return list(zip(calls, outputs, strict=True))


def test_spellingbee(fixtures, tok):
    train = load_task("spellingbee", path=fixtures["words"], size=60)
    assert load_task("spellingbee", path=fixtures["words"], size=60)["messages"] == train["messages"]
    test = load_task("spellingbee", "test", path=fixtures["words"], size=60)
    assert (
        train["messages"] != test["messages"] and len(load_task("spellingbee", "test", path=fixtures["words"])) == 256
    )
    for row in train:
        messages = row["messages"]
        ((code, output),) = _tool_pairs(messages)
        word, letter = re.fullmatch(r"'([a-z]+)'\.count\('([a-z])'\)", code).groups()
        assert word in WORDS and output == str(word.count(letter)) == row["answer"]
        assert eval(code) == int(output)  # the tool call computes what its output says
        assert f"\n{word}:{','.join(word)}\n" in messages[1]["content"]
        hits = re.findall(r"^(\d+):([a-z])( hit! count=(\d+))?$", messages[1]["content"], re.M)
        assert "".join(ch for _, ch, _, _ in hits) == word
        assert [int(n) for *_, n in hits if n] == list(range(1, word.count(letter) + 1))
        assert extract_answer(messages[-1]["content"]) == row["answer"]
        assert template_render(tok, messages) == nanochat_render(tok, as_nanochat_parts(messages))


def test_simplespelling(fixtures):
    ds = load_task("simplespelling", path=fixtures["words"], size=30)
    for row in ds:
        user, reply = row["messages"][0]["content"], row["messages"][1]["content"]
        word = user.removeprefix("Spell the word: ")
        assert word in WORDS and reply == f"{word}:{','.join(word)}"
    assert len({r["messages"][0]["content"] for r in ds}) > 5


def test_spelling_word_list_errors(tmp_path, monkeypatch):
    from huggingface_hub import constants

    (tmp_path / "bad.txt").write_text("apple\nice cream\n")
    with pytest.raises(ValueError, match="letters only, one per line; found 'ice cream'"):
        load_task("simplespelling", path=tmp_path / "bad.txt")
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"offline .* no word list at .*words_alpha\.txt; download https://"):
        load_task("spellingbee")


def test_arithmetic(tok):
    ds = load_task("arithmetic", size=200)
    assert load_task("arithmetic", size=200)["messages"] == ds["messages"]
    assert ds["messages"] != load_task("arithmetic", "test", size=200)["messages"]
    kinds = set()
    for row in ds:
        pairs = _tool_pairs(row["messages"])
        kinds.add(len(pairs))
        for code, output in pairs:
            assert re.fullmatch(r"-?\d+[-+*]\d+", code) and str(eval(code)) == output
        assert row["answer"] == pairs[-1][1] == extract_answer(row["messages"][-1]["content"])
        assert template_render(tok, row["messages"]) == nanochat_render(tok, as_nanochat_parts(row["messages"]))
    assert kinds == {1, 2}


# ---------------------------------------------------------------------------------------------------------------
# Mixtures


def test_cpu_mixtures_are_offline_deterministic_and_valid(tok):
    n_identity = len(load_task("identity"))
    mixes = {stage: build_mixture(stage, "cpu", seed=3) for stage in ("midtrain", "sft")}
    for stage, mix in mixes.items():
        assert mix.column_names == ["messages"]
        assert len(mix) == sum(n_identity if rows is None else rows for _, _, rows in mixture_parts(stage, "cpu"))
        for i, row in enumerate(mix.select(range(0, len(mix), len(mix) // 40))):
            validate_messages(row["messages"], f"{stage} mixture", i)
            template_render(tok, row["messages"])
    sft = mixes["sft"]["messages"]
    assert build_mixture("sft", "cpu", seed=3)["messages"] == sft
    reseeded = build_mixture("sft", "cpu", seed=4)["messages"]
    assert reseeded != sft and sorted(map(json.dumps, reseeded)) == sorted(map(json.dumps, sft))
    assert len(build_mixture("midtrain", "cpu", split="val")) == 250


def test_embedded_words():
    words = embedded_words()
    assert len(words) > 1000 and words == sorted(set(words)) and all(w.isalpha() and w.islower() for w in words)
    assert {"function", "class", "return"} <= set(words)


def test_nanochat_sft_mixture_from_local_copies(tmp_path, fixtures):
    data = tmp_path / "data"
    for name, repo_id in HUB_IDS.items():
        write_fixture(name, data / repo_id)
    write_fixture("words", data).rename(data / "words_alpha.txt")
    write_fixture("identity", data)
    mix = build_mixture("sft", "d20", data_dir=data)
    # ARC-Easy + ARC-Challenge + GSM8K + SmolTalk[:10K] + identity + SimpleSpelling 300 + SpellingBee 300
    expected = 2 + 1 + len(GSM8K["train"]) + len(SMOLTALK["train"]) + 2 + 300 + 300
    assert len(mix) == expected
    users = [r[0]["content"] for r in mix["messages"]]
    assert "Who are you?" in users  # the identity.jsonl of data_dir
    assert any(u.startswith("Multiple Choice question: A student drops a ball.") for u in users)  # ARC-Challenge
    assert sum(u.startswith("Spell the word: ") for u in users) == 300
    val = build_mixture("midtrain", "d20", data_dir=data, split="val")
    assert len(val) == len(SMOLTALK["test"]) + len(MMLU["test"]) + len(GSM8K["test"])
    own = build_mixture(
        "sft",
        "d12",
        data_dir=data,
        identity=write_fixture(
            "identity",
            tmp_path / "me",
            rows=[[{"role": "user", "content": "Name?"}, {"role": "assistant", "content": "Zed."}]],
        ),
    )
    assert "Name?" in [r[0]["content"] for r in own["messages"]] and len(own) == expected - 1


def test_nanochat_mixture_parts():
    mid = mixture_parts("midtrain", "d20")
    assert [(t, r) for t, _, r in mid] == [
        ("smoltalk", None),
        ("mmlu", None),
        ("gsm8k", None),
        ("identity", None),
        ("identity", None),
        ("simplespelling", 200_000),
        ("spellingbee", 80_000),
    ]
    assert ("mmlu", "auxiliary_train", None) in mid
    sft = mixture_parts("sft", "d32")
    assert ("smoltalk", "train", 10_000) in sft and ("arc_challenge", "train", None) in sft
    for bad, match in [(("pretrain", "d20"), "unknown stage"), (("sft", "d99"), "unknown tier 'd99'")]:
        with pytest.raises(ValueError, match=match):
            mixture_parts(*bad)
    assert set(TASK_NAMES) >= {t for parts in (mid, sft) for t, _, _ in parts}
