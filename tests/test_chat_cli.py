"""`nanochat-hf chat` for real on the tiny checkpoint: a one-shot prompt in a subprocess, and an interactive session
fed through stdin (/temperature, /clear, /quit), checked against the Engine's own greedy replies."""

import io
import os
import subprocess
import sys

import pytest

from nanochat_hf.inference.chat_cli import main
from nanochat_hf.inference.engine import Engine


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return Engine.from_pretrained(str(tiny_checkpoint))


def greedy_reply(engine, messages, max_tokens=12) -> str:
    return "".join(engine.stream_chat(messages, max_tokens=max_tokens, temperature=0.0))


def test_one_shot_prompt_in_a_subprocess(tiny_checkpoint, engine):
    out = subprocess.run(
        [sys.executable, "-m", "nanochat_hf.inference.chat_cli", "--model", str(tiny_checkpoint), "-p", "Why is the sky blue?",
         "-t", "0", "--max-tokens", "12", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    expected = greedy_reply(engine, [{"role": "user", "content": "Why is the sky blue?"}])
    assert expected and out.stdout == expected + "\n"


def run_session(monkeypatch, capsys, tiny_checkpoint, lines: list[str], *extra: str) -> str:
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    main(["--model", str(tiny_checkpoint), "--max-tokens", "12", "--device", "cpu", *extra])
    return capsys.readouterr().out


def test_interactive_session_with_clear_and_temperature(monkeypatch, capsys, tiny_checkpoint, engine):
    out = run_session(
        monkeypatch, capsys, tiny_checkpoint,
        ["/temperature 0", "Hello", "How are you?", "/clear", "Hello", "/temperature hot", "/quit", "never read"],
    )
    first = greedy_reply(engine, [{"role": "user", "content": "Hello"}])
    # the second turn sees the first (tool-call structure and all) in its prompt
    history = [{"role": "user", "content": "Hello"}]
    reply_ids = []
    list(engine.stream_chat(history, max_tokens=12, temperature=0.0, reply_ids=reply_ids))
    history += [engine.reply_message(reply_ids), {"role": "user", "content": "How are you?"}]
    second = greedy_reply(engine, history)
    assert "(temperature 0)" in out
    assert out.count("Assistant: " + first + "\n") == 2  # after /clear the same question gets the same answer
    assert "Assistant: " + second + "\n" in out
    assert "(conversation cleared)" in out
    assert "/temperature needs a number >= 0" in out
    assert out.count("Assistant: ") == 3  # nothing after /quit


def test_end_of_input_ends_the_session(monkeypatch, capsys, tiny_checkpoint):
    out = run_session(monkeypatch, capsys, tiny_checkpoint, ["/help", "/bogus"])
    assert "Commands: /clear" in out and "unknown command /bogus" in out


def test_sampled_replies_follow_the_seed(monkeypatch, capsys, tiny_checkpoint, engine):
    out = run_session(monkeypatch, capsys, tiny_checkpoint, ["Hello"], "-t", "1.0", "-k", "20", "--seed", "3")
    expected = "".join(engine.stream_chat([{"role": "user", "content": "Hello"}], max_tokens=12, temperature=1.0,
                                          top_k=20, seed=3))
    assert "Assistant: " + expected + "\n" in out


def test_missing_or_broken_model_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no model folder at .*nope.*pass --model a folder"):
        main(["--model", str(tmp_path / "nope"), "-p", "hi"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="(?s)cannot load a model from .*empty.*Pass --model a folder"):
        main(["--model", str(tmp_path / "empty"), "-p", "hi"])


@pytest.mark.parametrize(("flag", "value"), [("--temperature", "-1"), ("--max-tokens", "0")])
def test_bad_options_are_refused(tiny_checkpoint, flag, value):
    with pytest.raises(SystemExit, match=flag.lstrip("-").replace("-", ".")):
        main(["--model", str(tiny_checkpoint), "-p", "hi", flag, value])
