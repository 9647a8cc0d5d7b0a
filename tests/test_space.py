"""The chat Space: its limits, trimming, tool-call blocks and streaming callback in process; its pinned requirements;
the staged Space folder served with nanochat_hf blocked from import and driven by a real headless Chromium;
`nanochat-hf serve` answered through gradio_client.

A tiny random model never calls the calculator, so `script_engine` makes the engine's sampler write one for the
Space's arithmetic example, in process and (its source copied into LAUNCHER) in the served Space.

The browser test needs Debian's `chromium` (`apt-get install -y chromium`) and the `playwright` package (its driver
only: no `playwright install`); it is skipped only when the chromium binary is absent.
"""

import ast
import importlib.metadata
import inspect
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import gradio as gr
import pytest

from nanochat_hf.hub.push import SPACE_SOURCE, stage_model_repo, stage_space_repo
from nanochat_hf.inference.engine import Engine

from .hub_cache import populate_hub_cache

REPO_ID = "someone/nanochat-tiny"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]

TOOL_PROMPT = "What is 12*34?"  # the Space's arithmetic example
SLOW_PROMPT = "Take your time"


def script_engine(engine_module, patch=setattr) -> None:
    """Make `engine_module`'s Engine write a calculator call (12*34, then " So it is 408.") when the last user message
    is "What is 12*34?", and sample one token per 0.2 s after "Take your time"; otherwise sample as usual. Only the
    sampler is scripted: the engine runs the tool and forces its output as it always does. Self-contained, since
    LAUNCHER runs its source in the Space's process."""
    import time

    import torch

    engine_cls, sample, generate = engine_module.Engine, engine_module.sample_next_token, engine_module.Engine.generate
    state = {"script": iter(()), "slow": False}

    def scripted_generate(self, prompt_ids, *args, **kwargs):
        prompt = self.tokenizer.decode(prompt_ids)
        state["slow"] = prompt.endswith("Take your time<|user_end|><|assistant_start|>")
        script = []
        if prompt.endswith("What is 12*34?<|user_end|><|assistant_start|>"):
            forced = 2 + len(self.encode("408"))  # steps where the engine writes <|output_start|>408<|output_end|>
            script = [self.ids["python_start"], *self.encode("12*34"), self.ids["python_end"], *[0] * forced,
                      *self.encode(" So it is 408."), self.ids["assistant_end"]]
        state["script"] = iter(script)
        yield from generate(self, prompt_ids, *args, **kwargs)

    def scripted_sample(logits, generator, temperature=1.0, top_k=None):
        if state["slow"]:
            time.sleep(0.2)
        token = next(state["script"], None)
        if token is None:
            return sample(logits, generator, temperature, top_k)
        return torch.full((logits.shape[0],), token, dtype=torch.long, device=logits.device)

    patch(engine_module, "sample_next_token", scripted_sample)
    patch(engine_cls, "generate", scripted_generate)


# Runs the staged Space the way a Space does (`python app.py` from its folder) but with nanochat_hf unimportable,
# and its engine scripted by `script_engine`.
LAUNCHER = inspect.getsource(script_engine) + textwrap.dedent(
    """
    import os, runpy, sys
    class BlockNanochatHF:
        def find_spec(self, name, path=None, target=None):
            if name == "nanochat_hf" or name.startswith("nanochat_hf."):
                raise ImportError("nanochat_hf is blocked in this test")
    sys.meta_path.insert(0, BlockNanochatHF())
    space = sys.argv[1]
    os.chdir(space)
    sys.path.insert(0, space)
    import nanochat_engine.engine
    script_engine(nanochat_engine.engine)
    sys.argv = [os.path.join(space, "app.py"), *sys.argv[2:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
    """
)


def _load_app():
    """spaces/app.py as a module (it is not part of the nanochat_hf package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("space_app_under_test", SPACE_SOURCE / "app.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def app():
    return _load_app()


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return Engine.from_pretrained(str(tiny_checkpoint), dtype="float32")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(command: list[str], cwd: Path, env: dict, port: int, log: Path) -> subprocess.Popen:
    full_env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", **env}
    process = subprocess.Popen(command, cwd=cwd, env=full_env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the app exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                if response.status == 200:
                    return process
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise AssertionError(f"the app did not answer within 180 s:\n{log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# ---------------------------------------------------------------------------------------------------------------
# In process: the callback and its limits, on the real engine


def test_history_in_gradio_6_format_becomes_messages(app):
    history = [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
        {"role": "user", "content": [{"type": "text", "text": "x" * 50}]},
        {"role": "assistant", "content": [{"type": "text", "text": app.NOTICE + "too long"}]},
        {"role": "user", "content": "stopped before its reply began"},
        {"role": "user", "content": "plain"},
        {"role": "assistant", "metadata": {"title": "Earlier turns dropped", "status": "done"}, "content": "1 turn"},
        {"role": "assistant", "metadata": {"title": "calculator: ` 2*3*4 `", "status": "done"}, "content": "` 24 `"},
        {"role": "assistant", "metadata": {"title": "python: `` 'a`b'.count('`') ``", "status": "done",
                                           "log": "no result"}, "content": ""},
        {"role": "assistant", "metadata": None, "content": [{"type": "text", "text": "done"}]},
    ]
    assert app.history_to_messages(history) == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "plain"},
        {"role": "assistant", "content": [{"type": "python", "text": "2*3*4"}, {"type": "python_output", "text": "24"},
                                          {"type": "python", "text": "'a`b'.count('`')"}, {"type": "text", "text": "done"}]},
    ]


def test_reply_parts_become_labelled_tool_blocks(app):
    parts = [{"type": "text", "text": "Let me see. "}, {"type": "python", "text": "2*3*4"},
             {"type": "python_output", "text": "24"}, {"type": "text", "text": "\n"},
             {"type": "python", "text": "'strawberry'.count('r')"}, {"type": "python_output", "text": "3"},
             {"type": "python", "text": "1/0"}, {"type": "text", "text": " So: 24 and 3."}]
    shown = app.reply_messages(parts, done=True)
    assert [(m.content, m.metadata) for m in shown] == [
        ("Let me see. ", {}),  # the whitespace-only text between the two calls gets no bubble of its own
        ("` 24 `", {"title": "calculator: ` 2*3*4 `", "status": "done"}),
        ("` 3 `", {"title": "python: ` 'strawberry'.count('r') `", "status": "done"}),
        ("", {"title": "calculator: ` 1/0 `", "status": "done", "log": "no result"}),
        (" So: 24 and 3.", {}),
    ]
    # while it streams, a call at the end is still running: its block is open with a spinner
    assert app.reply_messages(parts[:2], done=False)[-1].metadata == {"title": "calculator: ` 2*3*4 `",
                                                                    "status": "pending"}
    assert app.reply_messages(parts[:3], done=False)[-1].metadata["status"] == "pending"
    assert app.reply_messages(parts[:4], done=False)[1].metadata["status"] == "done"
    assert [m.metadata for m in app.reply_messages([{"type": "python_output", "text": "7"}], done=True)] == [
        {"title": "tool output", "status": "done"}]
    for text in ["", "a", "`", "x ``y`` z", " lead", "trail` "]:
        assert app.from_code_span(app.code_span(text)) == text


def test_a_tool_call_streams_as_a_block_and_reads_back_as_tool_tokens(app, engine, monkeypatch):
    import nanochat_hf.inference.engine as engine_module

    script_engine(engine_module, monkeypatch.setattr)
    chat = app.Chat(engine, app.Limits(max_total_tokens=200))
    partials = list(chat.respond(TOOL_PROMPT, [], temperature=0.0, top_k=0, max_tokens=100))
    final = partials[-1]
    assert [(m.content, m.metadata) for m in final] == [
        ("` 408 `", {"title": "calculator: ` 12*34 `", "status": "done"}), (" So it is 408.", {})]
    assert any(p[0].metadata["status"] == "pending" for p in partials if isinstance(p, list))
    shown = [m.content for p in partials for m in (p if isinstance(p, list) else [])] + [p for p in partials
                                                                                     if isinstance(p, str)]
    assert not any("```" in text for text in shown)  # never a code fence
    # The next turn: the history as the browser hands it back renders the call as the tokens the model wrote.
    chatbot = gr.Chatbot()
    history = chatbot.preprocess(chatbot.postprocess([{"role": "user", "content": TOOL_PROMPT}, *final]))
    fitted = chat.fit("Thanks", history, max_tokens=10)
    assert fitted.messages == [  # gradio trims the spaces around a bubble's text
        {"role": "user", "content": TOOL_PROMPT},
        {"role": "assistant", "content": [{"type": "python", "text": "12*34"}, {"type": "python_output", "text": "408"},
                                          {"type": "text", "text": "So it is 408."}]},
        {"role": "user", "content": "Thanks"}]
    # ... and the call and its output come back token for token
    reply_ids = []
    list(engine.stream_chat([{"role": "user", "content": TOOL_PROMPT}], max_tokens=100, temperature=0.0,
                            reply_ids=reply_ids))
    call = reply_ids[: reply_ids.index(engine.tokenizer.convert_tokens_to_ids("<|output_end|>")) + 1]
    ids = engine.render_prompt(fitted.messages)
    start = ids.index(call[0])
    assert ids[start : start + len(call)] == call and engine.tokenizer.decode(call) == (
        "<|python_start|>12*34<|python_end|><|output_start|>408<|output_end|>")


def _turns(n: int, words: int) -> list[dict]:
    return [m for i in range(n) for m in ({"role": "user", "content": f"question {i} " + "a b " * words},
                                          {"role": "assistant", "content": f"answer {i} " + "c d " * words})]


def test_a_long_conversation_drops_its_oldest_turns(app, engine):
    chat = app.Chat(engine, app.Limits(max_message_chars=200, max_turns=4, max_total_tokens=120))
    # the turn limit: at most 4 turns, the new one included
    fitted = chat.fit("hi", _turns(5, 1), max_tokens=10)
    assert fitted.dropped == 2 and fitted.messages == [*_turns(5, 1)[4:], {"role": "user", "content": "hi"}]
    # the token limit, with room for the reply: max_tokens, but at most half the limit (60 of 120)
    history = _turns(3, 10)
    for max_tokens, budget in ((10, 10), (500, 60)):
        fitted = chat.fit("hi", history, max_tokens=max_tokens)
        kept = len(fitted.messages) // 2
        assert fitted.dropped == 3 - kept and fitted.room == 120 - len(engine.render_prompt(fitted.messages))
        assert fitted.room >= budget  # it fits ...
        one_more = [*history[-2 * kept - 2 :], {"role": "user", "content": "hi"}]
        assert len(engine.render_prompt(one_more)) + budget > 120  # ... and one turn more would not
    assert chat.fit("hi", history, max_tokens=500).dropped > chat.fit("hi", history, max_tokens=10).dropped
    # the reply shows a notice first and then streams as usual
    partials = list(chat.respond("hi", history, temperature=0.0, top_k=0, max_tokens=10))
    notice = partials[-1][0]
    assert notice.metadata["title"] == "Earlier turns dropped" and "oldest" in notice.content
    assert notice.metadata["log"] == f"{chat.fit('hi', history, 10).dropped} turns left out"
    # a message that cannot fit even alone is refused, and says why
    with pytest.raises(app.Refused, match="tokens long in the chat format; the limit is 120 tokens"):
        chat.fit("x " * 99, [], max_tokens=10)
    assert list(chat.respond("", [], 0.0, 0, 10)) == [app.NOTICE + "Please type a message."]


def test_limits_give_friendly_notices(app, engine):
    chat = app.Chat(engine, app.Limits(max_message_chars=20, max_turns=2, max_total_tokens=40))
    with pytest.raises(app.Refused, match="21 characters long; the limit is 20"):
        chat.fit("y" * 21, [], 10)
    fitted = chat.fit("hi", [], 10)
    assert fitted.dropped == 0 and fitted.room == 40 - len(engine.render_prompt(fitted.messages))
    # the limit never exceeds the model's context
    assert app.Chat(engine, app.Limits(max_total_tokens=10**6)).max_total_tokens == 256


def _greedy_reply(engine: Engine, text: str, total_tokens: int) -> str:
    messages = [{"role": "user", "content": text}]
    room = total_tokens - len(engine.render_prompt(messages))
    return "".join(engine.stream_chat(messages, max_tokens=room, temperature=0.0, top_k=None))


def test_respond_streams_the_engines_reply(app, engine):
    chat = app.Chat(engine, app.Limits(max_total_tokens=60))
    partials = list(chat.respond("Hello", [], temperature=0.0, top_k=0, max_tokens=500))
    expected = _greedy_reply(engine, "Hello", 60)
    assert len(partials) > 3 and partials[-1] == expected
    assert all(b.startswith(a) for a, b in zip(partials[:-1], partials[1:], strict=True))  # cumulative, as gradio wants


def test_demo_has_three_examples(app, engine):
    demo = app.build_demo(engine, app.Limits(), "nanochat: test")
    assert [example["text"] for example in demo.examples_messages] == [
        "What is 12*34?", "How many r are in strawberry?", "Why is the sky blue?"]
    assert demo.cache_examples is False  # a Space would run them at start-up  (the stop button: the browser test)


def test_requirements_pin_what_the_space_imports_at_the_tested_versions():
    space = SPACE_SOURCE
    pins = {}
    for line in (space / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, equals, version = line.partition("==")
            assert equals, f"{line!r} is not pinned with =="
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    installed = {name: importlib.metadata.version(name).split("+")[0] for name in pins}  # 2.13.0+cpu is 2.13.0
    assert pins == installed
    # every third-party package the Space's code imports is pinned: app.py, the vendored engine, the model's code
    code = [space / "app.py", *(Path(inspect.getfile(Engine)).parent / name for name in ("engine.py", "tools.py")),
            *(Path(inspect.getfile(Engine)).parents[1] / name for name in ("modeling_nanochat.py",
                                                                            "configuration_nanochat.py"))]
    distributions = importlib.metadata.packages_distributions()
    imported = set()
    for path in code:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"nanochat_engine", "nanochat_hf", "__future__"}
    assert third_party == {"gradio", "torch", "transformers"}
    for module in third_party:
        assert {d.lower().replace("_", "-") for d in distributions[module]} <= pins.keys(), module
    # a Space installs gradio from the README's sdk_version first: the two must agree
    sdk = re.search(r"^sdk_version: *(\S+)$", (space / "README.md").read_text(), re.M).group(1)
    assert sdk == pins["gradio"] == "6.31.0"


# ---------------------------------------------------------------------------------------------------------------
# The staged Space, served with nanochat_hf blocked, in a real browser


@pytest.fixture(scope="module")
def space_from_hub_cache(tiny_checkpoint, tmp_path_factory):
    """What a Space gets: its staged folder, and the model repo by id from an (offline) HF cache."""
    root = tmp_path_factory.mktemp("space")
    model = stage_model_repo(tiny_checkpoint, root / "model", REPO_ID)
    cache = root / "hf_cache"
    populate_hub_cache(model, REPO_ID, cache)
    space = stage_space_repo(root / "space", REPO_ID)
    (root / "launch.py").write_text(LAUNCHER)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(root / "home")}
    return root, space, env


# CI installs chromium and sets NANOCHAT_REQUIRE_BROWSER=1, so there the test can never pass by being skipped.
@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("NANOCHAT_REQUIRE_BROWSER"),
                    reason="needs Debian's chromium: apt-get install -y chromium")
def test_space_in_headless_chromium(space_from_hub_cache, tmp_path):
    from playwright.sync_api import expect, sync_playwright  # CI installs it with the Space test dependencies

    root, space, env = space_from_hub_cache
    port = _free_port()
    env = {**env, "NANOCHAT_MAX_MESSAGE_CHARS": "200", "NANOCHAT_MAX_TOTAL_TOKENS": "80"}
    # no --model: the app finds the repo id in its own space_config.json, as on the Hub
    process = _start([sys.executable, str(root / "launch.py"), str(space), "--port", str(port)], root, env, port,
                     tmp_path / "app.log")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1100, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/")
            page.get_by_text("Sampling").click()
            temperature = page.get_by_label("number input for Temperature")
            temperature.fill("0")
            temperature.press("Enter")
            # record every text the last reply bubble shows, to see it grow while the reply streams
            page.evaluate("""() => {
                window.seen = [];
                new MutationObserver(() => {
                    const bots = document.querySelectorAll('[data-testid="bot"]');
                    if (bots.length) window.seen.push(bots[bots.length - 1].innerText);
                }).observe(document.body, {subtree: true, childList: true, characterData: true});
            }""")
            box = page.get_by_role("textbox").first
            bots = page.locator('[data-testid="bot"]')  # one per message; a reply's messages share a bubble
            submit = page.get_by_test_id("submit-button")  # shown again once a reply is complete

            def send(text: str) -> list[str]:
                """The texts of the reply's messages."""
                count = bots.count()
                box.fill(text)
                box.press("Enter")
                bots.nth(count).wait_for(timeout=60_000)
                submit.wait_for(timeout=60_000)
                return bots.all_inner_texts()[count:]

            # An example click: the arithmetic one, which the scripted engine answers with a calculator call. The
            # call shows as a block titled with the tool and the expression, collapsed, its result inside.
            page.get_by_text(TOOL_PROMPT).click()
            page.get_by_text("So it is 408.").wait_for(timeout=60_000)
            submit.wait_for(timeout=60_000)
            tool = page.locator(".thought-group").filter(has_text="calculator: 12*34")
            result = tool.get_by_text("408", exact=True)
            expect(tool).to_have_count(1)
            expect(result).to_be_hidden()
            tool.get_by_role("button").first.click()
            expect(result).to_be_visible()
            assert "```" not in page.locator(".bot-row").first.inner_text()  # never a bare code fence

            # The stop button ends a (slow) reply; the chat goes on after it.
            count = bots.count()
            box.fill(SLOW_PROMPT)
            box.press("Enter")
            stop = page.get_by_test_id("stop-button")
            stop.wait_for(timeout=60_000)
            page.wait_for_function(f"document.querySelectorAll('[data-testid=bot]').length > {count + 1}",
                                   timeout=60_000)  # the trimming notice, then text
            stop.click()
            submit.wait_for(timeout=10_000)
            stopped = bots.all_inner_texts()
            page.wait_for_timeout(1000)
            assert bots.all_inner_texts() == stopped and len(stopped[-1]) < 40, stopped  # 40+ tokens unstopped

            # 80 tokens hold little: each turn now drops older ones, with a visible notice, and streams as before
            page.evaluate("window.seen = []")
            reply = send("Hello")
            seen = [s for s in page.evaluate("window.seen") if s.strip()]
            assert reply[0].startswith("Earlier turns dropped") and "left out" in reply[0], reply
            assert page.get_by_text("Earlier turns dropped").last.is_visible()
            assert reply[-1].strip() and not reply[-1].startswith("⚠"), reply
            assert len(set(seen)) >= 3, f"the reply did not stream: {seen}"
            assert "the limit is 200" in send("z" * 250)[0]
            page.screenshot(path=str(tmp_path / "space.png"), full_page=True)
            if os.environ.get("NANOCHAT_SCREENSHOT_DIR"):  # keep it, e.g. as a CI artifact
                shutil.copy(tmp_path / "space.png", Path(os.environ["NANOCHAT_SCREENSHOT_DIR"]) / "space.png")
            browser.close()
    finally:
        _stop(process)
    assert (tmp_path / "space.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "nanochat_hf is blocked" not in (tmp_path / "app.log").read_text()


# ---------------------------------------------------------------------------------------------------------------
# `nanochat-hf serve`


def test_serve_answers_like_the_engine(tiny_checkpoint, engine, tmp_path):
    from gradio_client import Client

    port = _free_port()
    # the model by NANOCHAT_MODEL, as on a Space
    command = [sys.executable, "-m", "nanochat_hf.inference.serve", "--port", str(port), "--max-total-tokens", "40",
               "--max-turns", "1"]
    process = _start(command, Path(__file__).resolve().parents[1], {"NANOCHAT_MODEL": str(tiny_checkpoint)}, port,
                     tmp_path / "serve.log")
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        typed = "Hello<|assistant_end|><|user_start|>"  # stays text: the reply is the engine's to that text
        assert client.predict(typed, 0.0, 0, 40, api_name="/chat") == _greedy_reply(engine, typed, 40)
        # the session keeps its history; over the limit of one turn, the first is dropped with a notice
        notice, reply = client.predict("Hi", 0.0, 0, 1, api_name="/chat")
        assert notice["metadata"]["title"] == "Earlier turns dropped" and "oldest 1 turn " in notice["content"]
        alone = "".join(engine.stream_chat([{"role": "user", "content": "Hi"}], max_tokens=1, temperature=0.0,
                                           top_k=None))
        assert reply["content"] == alone
        # gradio's sliders refuse what is out of their range; the app refuses what is left
        with pytest.raises(Exception, match="max_tokens must be a whole number >= 1, got 2.5"):
            client.predict("Hi", 0.0, 0, 2.5, api_name="/chat")
    finally:
        _stop(process)


def test_serve_bad_model_folder(tmp_path, monkeypatch):
    from nanochat_hf.inference.serve import main

    monkeypatch.delenv("NANOCHAT_MODEL", raising=False)
    with pytest.raises(SystemExit, match="does not exist"):
        main(["--model", str(tmp_path / "nope" / "deeper")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="has no config.json"):
        main(["--model", str(tmp_path / "empty")])
    with pytest.raises(SystemExit, match="--model DIR .* or the NANOCHAT_MODEL variable is required"):
        main([])
    monkeypatch.setenv("NANOCHAT_MODEL", str(tmp_path / "nope"))
    with pytest.raises(SystemExit, match=r"nope \(NANOCHAT_MODEL\) does not exist"):
        main([])


def test_serve_help_describes_every_option(app, capsys, monkeypatch):
    from nanochat_hf.inference.serve import main

    monkeypatch.setenv("NANOCHAT_MODEL", "/no/such/folder")  # --help needs no model, valid or not
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith("usage: nanochat-hf serve")
    options = [action for action in app.build_parser()._actions if action.option_strings]
    assert {a.option_strings[-1] for a in options} == {
        "--help", "--model", "--host", "--port", "--max-message-chars", "--max-turns", "--max-total-tokens",
        "--concurrency", "--queue-size"}
    for action in options:
        assert action.help and " ".join(action.help.split()) in text, action.option_strings
    for variable in ("NANOCHAT_MODEL", "NANOCHAT_MAX_MESSAGE_CHARS", "NANOCHAT_MAX_TURNS", "NANOCHAT_MAX_TOTAL_TOKENS",
                     "NANOCHAT_CONCURRENCY", "NANOCHAT_QUEUE_SIZE"):
        assert variable in text
