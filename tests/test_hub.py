"""`nanochat-hf push`: the staged folder is what the Hub gets; it loads by repo id from an offline HF cache without
nanochat_hf; its card is valid metadata; the real `HfApi.upload_folder` path makes one commit per repo; without a
token or network the push stops with a clear error before anything is sent."""

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, ModelCardData, metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results

from nanochat_hf import NanoChatForCausalLM
from nanochat_hf.hub.model_card import clean_text, find_results_files, publishable_report, read_results
from nanochat_hf.hub.push import HubError, main, push, stage_model_repo, stage_space_repo

from .hub_cache import populate_hub_cache

REPO_ID = "someone/nanochat-tiny"
REPORT = "# nanochat training report\n\n## Summary\n\n| Metric | BASE | SFT |\n|---|---|---|\n| CORE | 0.2219 | - |\n"
LIGHTEVAL_RESULTS = {
    "config_general": {"model_name": "sft", "start_time": 12.5},
    "results": {
        "custom|core|0": {"acc": 0.2219, "acc_stderr": 0.01},
        "community|chat:gsm8k|0": {"em": 0.0455},
        "all": {"acc": 0.2219},
    },
    "versions": {"custom|core|0": 0},
}

# what `nanochat-hf eval --stage sft` writes into the model folder (nanochat_hf/evaluation/evaluate.py)
NANOCHAT_EVAL = {
    "model": "runs/cpu/sft", "stage": "sft", "max_per_task": 16,
    "chat": {"tasks": {"ARC-Easy": {"accuracy": 0.3876, "correct": 6, "total": 16},
                       "GSM8K": {"accuracy": 0.0455}, "SpellingBee": {"accuracy": 0.5}},
             "chatcore": 0.0884, "chatcore_cat": 0.1021},
    "seconds": 12.5,
}

BLOCK = textwrap.dedent(
    """
    import sys
    class BlockNanochatHF:
        def find_spec(self, name, path=None, target=None):
            if name == "nanochat_hf" or name.startswith("nanochat_hf."):
                raise ImportError("nanochat_hf is blocked in this test")
    sys.meta_path.insert(0, BlockNanochatHF())
    """
)

LOADER = BLOCK + textwrap.dedent(
    """
    import re, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    repo, card_path, out_path = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hello there"}], add_generation_prompt=True,
                                        return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    # the card's usage snippet, exactly as a reader would paste it
    snippet = re.search(r"```python\\n(.*?)```", open(card_path).read(), re.S).group(1)
    exec(snippet, {})
    assert "nanochat_hf" not in sys.modules
    torch.save({"ids": ids, "logits": logits, "eos": model.generation_config.eos_token_id}, out_path)
    """
)


def _run_python(script: str, args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    path = cwd / "script.py"
    path.write_text(script)
    return subprocess.run([sys.executable, str(path), *args], cwd=cwd, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_checkpoint):
    """A run folder as the pipeline leaves it: the checkpoint, the report card and eval results beside it."""
    run = tmp_path_factory.mktemp("run")
    shutil.copytree(tiny_checkpoint, run / "sft")
    (run / "sft" / "eval_sft.json").write_text(json.dumps(NANOCHAT_EVAL))
    (run / "report.md").write_text(REPORT)
    (run / "eval_results.json").write_text(json.dumps(LIGHTEVAL_RESULTS))
    (run / "speedrun_log.json").write_text(json.dumps({"pretrain": {"seconds": 12.0}}))  # not results: ignored
    return run


@pytest.fixture(scope="module")
def staged(run_dir, tmp_path_factory):
    return stage_model_repo(run_dir / "sft", tmp_path_factory.mktemp("stage") / "model", REPO_ID)


def test_staged_folder_holds_exactly_the_repo_files(staged, tiny_checkpoint):
    assert sorted(p.name for p in staged.iterdir()) == sorted([
        "README.md", "config.json", "configuration_nanochat.py", "modeling_nanochat.py", "model.safetensors",
        "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "report.md",
        "custom_generate",  # the calculator tool loop for generate() (tests/test_custom_generate.py)
    ])
    config = json.loads((staged / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_nanochat.NanoChatConfig",
                                  "AutoModelForCausalLM": "modeling_nanochat.NanoChatForCausalLM"}
    assert (staged / "model.safetensors").read_bytes() == (tiny_checkpoint / "model.safetensors").read_bytes()


def test_staged_repo_loads_by_repo_id_offline_without_nanochat_hf(staged, tiny_checkpoint, tmp_path):
    cache = tmp_path / "hf_cache"
    populate_hub_cache(staged, REPO_ID, cache)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    result = _run_python(LOADER, [REPO_ID, str(staged / "README.md"), str(tmp_path / "out.pt")], tmp_path, env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    expected = NanoChatForCausalLM.from_pretrained(tiny_checkpoint).eval()
    with torch.no_grad():
        assert torch.equal(out["logits"], expected(out["ids"]).logits)
    assert out["eos"] == expected.generation_config.eos_token_id


def test_model_card_metadata_is_valid(staged):
    # ModelCard.validate posts to huggingface.co/api/validate-yaml (network): offline, the card is parsed and its
    # metadata rebuilt with huggingface_hub's own ModelCardData, which raises on malformed model-index entries.
    card = ModelCard.load(staged / "README.md")
    metadata = metadata_load(staged / "README.md")
    data = ModelCardData(**metadata)
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert {"nanochat", "custom_code"} <= set(data.tags)
    # no speedrun.json beside the checkpoint: no record of its training data, so no claim about it
    assert data.datasets is None and "makes no claim about how it was trained" in card.text
    name, results = model_index_to_eval_results(metadata["model-index"])
    assert name == "nanochat-tiny"
    # every result measured, under lighteval's task and metric names (evals/README.md)
    found = {(r.task_name, r.metric_type): r.metric_value for r in results}
    assert found == {("core|0", "acc"): 0.2219, ("chat:gsm8k|0", "em"): 0.0455, ("chat:arc_easy|0", "acc"): 0.3876,
                     ("chat:gsm8k|0", "acc"): 0.0455, ("ChatCORE", "chatcore"): 0.0884,
                     ("ChatCORE_cat", "chatcore_cat"): 0.1021, ("chat:spellingbee|0", "acc"): 0.5}
    arc = next(r for r in results if r.task_name == "chat:arc_easy|0")
    assert (arc.task_type, arc.dataset_type, arc.dataset_config, arc.dataset_split) == (
        "multiple-choice", "allenai/ai2_arc", "ARC-Easy", "test")
    gsm8k = next(r for r in results if r.task_name == "chat:gsm8k|0")
    assert (gsm8k.task_type, gsm8k.dataset_type) == ("text-generation", "openai/gsm8k")
    assert "| `chat:arc_easy\\|0` | acc | 0.3876 |" in card.text  # the pipe escaped inside the table
    # the report card is in the body, its headings below the card's own
    assert "## nanochat training report" in card.text and "| CORE | 0.2219 | - |" in card.text


def test_results_reading_is_tolerant(tmp_path):
    model = tmp_path / "run" / "sft"
    (model / "results" / "lighteval").mkdir(parents=True)
    (model / "results" / "lighteval" / "results_2026.json").write_text(json.dumps(LIGHTEVAL_RESULTS))
    (model / "eval_base.json").write_text(json.dumps({
        "model": "m", "stage": "base", "max_per_task": -1, "seconds": 3.0,
        "core": {"results": {"hellaswag": 0.3}, "centered_results": {"hellaswag": 0.07}, "core_metric": 0.2219,
                 "examples": {"hellaswag": 100}},
        "bpb": {"val_bpb": 0.81, "tokens": 1000, "data": "x"}}))
    (model.parent / "eval_results.json").write_text(json.dumps({"CORE": 0.25, "ChatCORE": 0.1, "note": "x"}))
    (model.parent / "sft_results.json").write_text(json.dumps({"sft": {"mmlu": {"acc": 0.31, "acc_stderr": 0.1}}}))
    (model.parent / "broken_results.json").write_text("{not json")
    (model.parent / "empty_results.json").write_text(json.dumps({"model": "sft"}))
    (model.parent / "trainer_state.json").write_text(json.dumps({"loss": 1.0}))  # not a results file
    files = find_results_files(model)
    assert {p.name for p in files} == {"eval_base.json", "results_2026.json", "eval_results.json", "sft_results.json",
                                       "broken_results.json", "empty_results.json"}
    got = {(r.task, r.metric, r.value) for r in read_results(files)}
    assert got == {("core|0", "centered", 0.2219), ("bits_per_byte", "bpb", 0.81), ("core|0", "acc", 0.2219),
                   ("chat:gsm8k|0", "em", 0.0455), ("CORE", "score", 0.25), ("ChatCORE", "score", 0.1),
                   ("sft/mmlu", "acc", 0.31)}


def test_a_base_eval_with_bits_per_byte_alone_gives_the_validation_bpb(tmp_path):
    # the CPU tier's base stage without an eval bundle: bits per byte on both splits, no CORE
    path = tmp_path / "eval_base.json"
    path.write_text(json.dumps({"model": "m", "stage": "base", "seconds": 3.0, "bpb": {
        "train_bpb": 0.83, "val_bpb": 0.81, "tokens": 65536, "tokens_read": {"train": 65536, "val": 65536},
        "dtype": "float32", "data": "x"}}))
    assert [(r.task, r.metric, r.value) for r in read_results([path])] == [("bits_per_byte", "bpb", 0.81)]


def test_no_results_and_no_report_still_make_a_valid_card(tiny_checkpoint, tmp_path):
    model = tmp_path / "alone"
    shutil.copytree(tiny_checkpoint, model)
    staged = stage_model_repo(model, tmp_path / "out", REPO_ID, datasets=())
    metadata = metadata_load(staged / "README.md")
    assert "model-index" not in metadata and "datasets" not in metadata
    ModelCardData(**metadata)


def test_published_text_keeps_no_local_path_and_no_progress_bar_residue(tmp_path):
    from nanochat_hf.hub.model_card import local_roots

    run = tmp_path / "run"
    text = (f"data: {run}/corpus\n"
            "Loading weights:   0%|          | 0/35 [00:00<?, ?it/s]\n"
            "Loading weights: 100%|##########| 35/35 [00:00<00:00, 300.00it/s]\n"
            "step 1\rstep 2\rstep 3 done\r\n"
            f"$ {sys.prefix}/bin/python -m nanochat_hf.evaluation.evaluate\n"
            "see /srv/cache/bundle/core.yaml, https://huggingface.co/datasets/openai/gsm8k and "
            "train/<stage>/losses.jsonl\n")
    assert clean_text(text, local_roots(run)).splitlines() == [
        "data: ./corpus",
        "Loading weights: 100%|##########| 35/35 [00:00<00:00, 300.00it/s]",  # only the bar's final state
        "step 3 done",  # what the terminal showed last
        "$ <python>/bin/python -m nanochat_hf.evaluation.evaluate",
        "see <local path>, https://huggingface.co/datasets/openai/gsm8k and train/<stage>/losses.jsonl",
    ]


def test_the_published_report_drops_the_run_folder_and_the_stage_logs(tmp_path):
    run = tmp_path / "run"
    report = "\n".join([
        "# nanochat-hf training report", "", f"- Run folder: `{run}`", "- Tier: cpu", "",
        "## Stage logs", "", "### logs/pretrain.log (last 2 lines)", "", "````",
        "## a log line, not a heading", f"$ python -m nanochat_hf.training.pretrain --output_dir {run}/train", "````",
        "", "## Notes", "", "- `train/sft/bpb.jsonl` could not be read", "",
    ])
    assert publishable_report(report, {run: "."}) == (
        "# nanochat-hf training report\n\n- Tier: cpu\n\n## Notes\n\n- `train/sft/bpb.jsonl` could not be read\n")


def test_the_report_and_its_plots_are_staged_beside_the_card(tiny_checkpoint, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_checkpoint, run / "sft")
    (run / "report").mkdir()
    (run / "report" / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n a plot")
    (run / "report.md").write_text(f"# report\n\n- Run folder: `{run}`\n\n![training loss](report/loss.png)\n\n"
                                   f"![gone](report/gone.png)\n![absolute]({run / 'report' / 'loss.png'})\n")
    staged = stage_model_repo(run / "sft", tmp_path / "out", REPO_ID, datasets=["karpathy/climbmix-400b-shuffle"])
    assert (staged / "report" / "loss.png").read_bytes() == b"\x89PNG\r\n\x1a\n a plot"
    assert sorted(p.name for p in (staged / "report").iterdir()) == ["loss.png"]
    card = ModelCard.load(staged / "README.md")
    assert card.text.count("(report/loss.png)") == 2 and "gone" not in card.text
    assert metadata_load(staged / "README.md")["datasets"] == ["karpathy/climbmix-400b-shuffle"]  # as given
    published = (staged / "report.md").read_text()
    assert "![training loss](report/loss.png)" in published and str(tmp_path) not in published + card.text


def test_a_run_folder_must_be_a_speedrun_holding_the_model(tiny_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="has no speedrun.json"):
        stage_model_repo(tiny_checkpoint, tmp_path / "out", REPO_ID, run_dir=tmp_path)
    (tmp_path / "speedrun.json").write_text(json.dumps({"tier": "cpu", "pipeline": "2025", "stages": {}}))
    with pytest.raises(ValueError, match="is not one of the model folders"):
        stage_model_repo(tiny_checkpoint, tmp_path / "out", REPO_ID, run_dir=tmp_path)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage, message", [
    ("no_weights", "has no model.safetensors"),
    ("bin_weights", "PyTorch .bin weights only"),
    ("no_tokenizer", "has no tokenizer"),
    ("wrong_type", "not 'nanochat_hf'"),
    ("missing", "does not exist"),
])
def test_bad_model_folder_fails_clearly_without_output(damage, message, tiny_checkpoint, tmp_path):
    model = tmp_path / "model"
    if damage != "missing":
        shutil.copytree(tiny_checkpoint, model)
    if damage in ("no_weights", "bin_weights"):
        (model / "model.safetensors").unlink()
    if damage == "bin_weights":
        (model / "pytorch_model.bin").write_bytes(b"")
    if damage == "no_tokenizer":
        (model / "tokenizer.json").unlink()
    if damage == "wrong_type":
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "model_type": "nanochat"}))
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
        stage_model_repo(model, tmp_path / "out", REPO_ID)
    assert not (tmp_path / "out").exists()


def test_bad_repo_id_and_missing_results_file(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="USER/NAME"):
        stage_model_repo(tiny_checkpoint, tmp_path / "out", "just-a-name")
    with pytest.raises(FileNotFoundError, match="results file"):
        stage_model_repo(tiny_checkpoint, tmp_path / "out", REPO_ID, results_files=[tmp_path / "nope.json"])
    assert not (tmp_path / "out").exists()


def _no_token_env(monkeypatch, tmp_path):
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no stored token
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr("huggingface_hub.constants.HF_STORED_TOKENS_PATH", str(tmp_path / "hf_home" / "tokens"))
    monkeypatch.setattr(
        "huggingface_hub.utils._auth._get_token_from_google_colab", lambda: None, raising=False)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))


def test_push_without_token_is_a_clear_error(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    _no_token_env(monkeypatch, tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tiny_checkpoint), "--repo-id", REPO_ID])
    assert exit_info.value.code == 2
    assert "no Hugging Face token" in capsys.readouterr().err


def test_push_to_unreachable_hub_is_a_clear_error_and_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    _no_token_env(monkeypatch, tmp_path)
    with pytest.raises(HubError, match="cannot reach the Hub at http://127.0.0.1:9"):
        push(tiny_checkpoint, REPO_ID, token="hf_test", endpoint="http://127.0.0.1:9")
    assert not list(tmp_path.glob("nanochat-hf-push-*"))  # the staging folder is gone too


def test_push_offline_mode_refuses(tiny_checkpoint, tmp_path, monkeypatch):
    _no_token_env(monkeypatch, tmp_path)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        push(tiny_checkpoint, REPO_ID, token="hf_test", endpoint="http://127.0.0.1:9")


# -------------------------------------------------------------------------------------------------------------
# A local stand-in for the Hub's HTTP API: just the endpoints `HfApi.upload_folder` calls, recording each commit.


class LocalHub(ThreadingHTTPServer):
    def __init__(self, refuse_space: bool = False):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.commits: list[dict] = []
        self.created: list[dict] = []
        self.unexpected: list[str] = []
        self.refuse_space = refuse_space
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"


class HubHandler(BaseHTTPRequestHandler):
    server: LocalHub

    def log_message(self, *args):
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def do_GET(self):
        if self.path.startswith("/api/whoami-v2"):
            if self.headers.get("Authorization") != "Bearer hf_test":
                return self._reply(401, {"error": "Invalid credentials"})
            return self._reply(200, {"type": "user", "name": "someone", "auth": {"accessToken": {"role": "write"}}})
        self.server.unexpected.append(f"GET {self.path}")
        self._reply(404, {"error": "not here"})

    def do_POST(self):
        body = self._body()
        path = self.path.split("?")[0]
        if path == "/api/repos/create":
            request = json.loads(body)
            if request.get("type") == "space" and self.server.refuse_space:
                return self._reply(403, {"error": "You don't have the rights to create this Space"})
            self.server.created.append(request)
            prefix = "spaces/" if request.get("type") == "space" else ""
            return self._reply(200, {"url": f"{self.server.endpoint}/{prefix}{request['organization']}/"
                                            f"{request['name']}"})
        if path == "/api/validate-yaml":
            return self._reply(200, {})
        match = re.fullmatch(r"/api/(models|spaces)/([^/]+/[^/]+)/(preupload|commit)/main", path)
        if match and match.group(3) == "preupload":
            files = json.loads(body)["files"]
            return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                               for f in files]})
        if match:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            files = {e["value"]["path"]: base64.b64decode(e["value"]["content"]) for e in lines if e["key"] == "file"}
            header = next(e["value"] for e in lines if e["key"] == "header")
            self.server.commits.append({"repo": f"{match.group(1)}/{match.group(2)}", "summary": header["summary"],
                                        "files": files, "keys": {e["key"] for e in lines}})
            oid = f"{len(self.server.commits):040x}"
            return self._reply(200, {"commitUrl": f"{self.server.endpoint}/{match.group(2)}/commit/{oid}",
                                     "commitOid": oid})
        self.server.unexpected.append(f"POST {self.path}")
        self._reply(404, {"error": "not here"})


@pytest.fixture
def local_hub():
    servers = []

    def start(**kwargs) -> LocalHub:
        server = LocalHub(**kwargs)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_push_makes_one_commit_per_repo_with_the_staged_files(run_dir, local_hub, tmp_path, monkeypatch):
    _no_token_env(monkeypatch, tmp_path)
    hub = local_hub()
    result = push(run_dir / "sft", REPO_ID, token="hf_test", endpoint=hub.endpoint, space_id="someone/chat")
    assert hub.unexpected == []
    assert [c["repo"] for c in hub.commits] == [f"models/{REPO_ID}", "spaces/someone/chat"]
    expected_model = _folder_bytes(stage_model_repo(run_dir / "sft", tmp_path / "m", REPO_ID,
                                                    space_id="someone/chat"))
    assert hub.commits[0]["files"] == expected_model
    assert hub.commits[0]["keys"] == {"header", "file"}  # only additions
    space_files = hub.commits[1]["files"]
    assert space_files == _folder_bytes(stage_space_repo(tmp_path / "s", REPO_ID))
    assert json.loads(space_files["space_config.json"]) == {"model": REPO_ID}
    assert {"app.py", "requirements.txt", "README.md", "nanochat_engine/engine.py"} <= set(space_files)
    assert [(c["type"], c["name"], c.get("sdk")) for c in hub.created] == [
        ("model", "nanochat-tiny", None), ("space", "chat", "gradio")]
    assert result.space_url.endswith("/spaces/someone/chat") and result.commit_url.startswith(hub.endpoint)


def test_push_commits_nothing_when_the_space_is_refused(run_dir, local_hub, tmp_path, monkeypatch):
    _no_token_env(monkeypatch, tmp_path)
    hub = local_hub(refuse_space=True)
    with pytest.raises(HubError, match="refused the token"):
        push(run_dir / "sft", REPO_ID, token="hf_test", endpoint=hub.endpoint, space_id="someone/chat")
    assert hub.commits == []


def test_push_with_a_rejected_token(run_dir, local_hub, tmp_path, monkeypatch):
    _no_token_env(monkeypatch, tmp_path)
    hub = local_hub()
    with pytest.raises(HubError, match="refused the token"):
        push(run_dir / "sft", REPO_ID, token="hf_wrong", endpoint=hub.endpoint)
    assert hub.commits == [] and hub.created == []


def test_dry_run_writes_the_folders(run_dir, tmp_path, capsys):
    main(["--model", str(run_dir / "sft"), "--repo-id", REPO_ID, "--space", "someone/chat",
          "--dry-run", str(tmp_path / "out")])
    assert (tmp_path / "out" / "model" / "model.safetensors").exists()
    assert (tmp_path / "out" / "space" / "nanochat_engine" / "tools.py").exists()
    assert "staged the model repo" in capsys.readouterr().out
    # a bad model folder leaves no half-staged output behind
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "nope"), "--repo-id", REPO_ID, "--space", "someone/chat",
              "--dry-run", str(tmp_path / "out2")])
    assert not (tmp_path / "out2" / "space").exists()


def test_vendored_engine_may_import_only_torch_transformers_and_stdlib(tmp_path):
    from nanochat_hf.hub.push import _check_imports

    good, bad = tmp_path / "good.py", tmp_path / "bad.py"
    good.write_text("import os\nimport torch\nfrom transformers import AutoTokenizer\nfrom .tools import calculate\n")
    bad.write_text("import torch\nfrom nanochat_hf.tokenizer.bpe import encode\n")
    _check_imports(good, {"torch", "transformers"})
    with pytest.raises(ValueError, match="imports 'nanochat_hf.tokenizer.bpe'"):
        _check_imports(bad, {"torch", "transformers"})
