"""The arguments every Hugging Face user already types (issue 17 §1): `--config FILE` / `--config=FILE`, every field
of the Trainer's config on the command line over the recipe, nanochat's settings as the defaults `--help` shows,
the Trainer's names of nanochat's settings as aliases, `--push_to_hub` through the Trainer's own path, and the
project and run name handed to trackio and wandb."""

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import yaml

from nanochat_hf.errors import UsageError
from nanochat_hf.evaluation.evaluate import parse_eval_args
from nanochat_hf.training.midtrain import parse_midtrain_args
from nanochat_hf.training.pretrain import parse_args, training_arguments
from nanochat_hf.training.rl import grpo_config, parse_rl_args
from nanochat_hf.training.sft import parse_sft_args, sft_config

from .chat_fixtures import conversations, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
PARSERS = {"pretrain": parse_args, "midtrain": parse_midtrain_args, "sft": parse_sft_args, "rl": parse_rl_args,
           "eval": parse_eval_args}
CPU_RECIPES = {"pretrain": "recipes/cpu/pretrain.yaml", "midtrain": "recipes/cpu/midtrain.yaml",
               "sft": "recipes/cpu/sft.yaml", "rl": "recipes/cpu/rl.yaml"}


def cpu(stage: str) -> str:
    return str(ROOT / CPU_RECIPES[stage])


@pytest.fixture
def eval_recipe(tmp_path) -> Path:
    path = tmp_path / "eval.yaml"
    path.write_text("model: runs/cpu/sft\nstage: sft\ntier: cpu\nmax_per_task: 3\nbatch_size: 4\n")
    return path


# ---------------------------------------------------------------------------------------------------------------
# --config


@pytest.mark.parametrize("stage", ["pretrain", "midtrain", "sft", "rl"])
def test_config_equals_sign_reads_the_same_recipe(stage):
    spaced = PARSERS[stage](["--config", cpu(stage)])
    joined = PARSERS[stage]([f"--config={cpu(stage)}"])
    assert joined == spaced


def test_eval_reads_a_recipe(eval_recipe):
    for argv in (["--config", str(eval_recipe)], [f"--config={eval_recipe}"]):
        args = parse_eval_args(argv)
        assert (args.model, args.stage, args.tier, args.max_per_task, args.batch_size) == ("runs/cpu/sft", "sft",
                                                                                            "cpu", 3, 4)
    assert parse_eval_args(["--config", str(eval_recipe), "--max-per-task", "5"]).max_per_task == 5


@pytest.mark.parametrize("stage", sorted(PARSERS))
@pytest.mark.parametrize("argv", [["--config"], ["--config="], ["--config", "--depth", "3"]],
                         ids=["bare", "empty", "flag-follows"])
def test_config_without_a_file_is_a_usage_error(stage, argv):
    with pytest.raises(UsageError, match="^--config: expected a recipe file"):
        PARSERS[stage](argv)


def test_two_recipes_are_refused():
    with pytest.raises(UsageError, match="give one recipe"):
        parse_args(["--config", cpu("pretrain"), f"--config={cpu('pretrain')}"])


@pytest.mark.parametrize("stage", ["pretrain", "sft", "rl", "eval"])
def test_unknown_recipe_key_and_argument_are_named(stage, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rat: 0.1\n")
    with pytest.raises(UsageError, match=r"unknown keys \['learning_rat'\]"):
        PARSERS[stage](["--config", str(bad)])
    with pytest.raises(UsageError, match="--no_such_field"):
        PARSERS[stage](["--no_such_field", "1"])


def test_every_recipe_key_lands_on_its_field_unchanged():
    """The recipes keep their effective values: each key of every recipe is the value of its field after parsing."""
    for path in sorted((ROOT / "recipes").glob("*/*.yaml")):
        stage = path.stem.removesuffix("-2026")
        args = PARSERS[stage](["--config", str(path)])
        for key, value in yaml.safe_load(path.read_text()).items():
            assert getattr(args, key) == value, (path, key)
        assert args.trainer_args == {}, path


# ---------------------------------------------------------------------------------------------------------------
# the Trainer's fields


def test_trainer_fields_on_the_command_line_override_the_recipe(tmp_path):
    recipe = tmp_path / "pretrain.yaml"
    recipe.write_text(Path(cpu("pretrain")).read_text() + "run_name: from-recipe\nmax_grad_norm: 2.0\n"
                      "logging_first_step: true\n")
    run = parse_args(["--config", str(recipe), "--run_name", "from-cli", "--project", "nanochat-tests",
                      "--push_to_hub", "--hub_model_id", "someone/tiny", "--seed", "7", "--output_dir", "elsewhere",
                      "--report_to", "tensorboard", "--gradient_checkpointing", "true", "--dataloader_pin_memory",
                      "false"])
    args = training_arguments(run)
    assert (args.run_name, args.project, args.push_to_hub, args.hub_model_id) == ("from-cli", "nanochat-tests", True,
                                                                                  "someone/tiny")
    assert (args.seed, run.seed, args.output_dir, run.output_dir) == (7, 7, "elsewhere", "elsewhere")
    assert args.report_to == ["tensorboard"] and args.activation_checkpointing is True
    assert args.max_grad_norm == 2.0 and args.logging_first_step is True and args.dataloader_pin_memory is False
    # the recipe's own fields keep their values
    assert (run.depth, run.head_dim, run.max_seq_len, run.total_batch_size) == (4, 64, 512, 4096)


def test_nanochats_settings_are_the_defaults():
    args = training_arguments(parse_args(["--config", cpu("pretrain")]))
    assert (args.max_grad_norm, args.weight_decay, args.activation_checkpointing, args.ddp_broadcast_buffers) == (
        0.0, 0.0, False, False)
    assert (args.report_to, args.run_name, args.project, args.push_to_hub) == ([], None, "nanochat", False)
    assert (args.logging_steps, args.save_total_limit, args.per_device_train_batch_size, args.seed) == (10, 2, 8, 42)
    sft = sft_config(parse_sft_args(["--config", cpu("sft")]), max_length=256, eval_set=None)
    assert (sft.max_grad_norm, sft.activation_checkpointing, sft.project, sft.max_steps, sft.logging_steps) == (
        0.0, False, "nanochat-sft", -1, 5)
    rl = grpo_config(parse_rl_args(["--config", cpu("rl")]))
    assert (rl.beta, rl.num_iterations, rl.scale_rewards, rl.loss_type, rl.max_steps, rl.project) == (
        0.0, 1, "none", "bnpo", 8, "nanochat-rl")
    mid = training_arguments(parse_midtrain_args(["--config", cpu("midtrain")]))
    assert mid.project == "nanochat-mid"


@pytest.mark.parametrize(("stage", "argv", "field", "value"), [
    ("pretrain", ["--max_steps", "5"], "num_iterations", 5),
    ("pretrain", ["--learning_rate", "0.03"], "matrix_lr", 0.03),
    ("pretrain", ["--per_device_train_batch_size", "4"], "device_batch_size", 4),
    ("pretrain", ["--logging_steps", "2"], "log_every", 2),
    ("pretrain", ["--save_steps", "20"], "save_every", 20),
    ("pretrain", ["--save_total_limit", "1"], "keep_last", 1),
    ("pretrain", ["--eval_steps", "30"], "eval_every", 30),
    ("pretrain", ["--dataloader_num_workers", "1"], "num_workers", 1),
    ("midtrain", ["--max_steps", "3"], "num_iterations", 3),
    ("sft", ["--max_steps", "6"], "num_iterations", 6),
    ("sft", ["--num_train_epochs", "2"], "num_epochs", 2.0),
    ("sft", ["--max_length", "128"], "max_seq_len", 128),
    ("sft", ["--dataset_num_proc", "2"], "num_proc", 2),
    ("rl", ["--max_steps", "4"], "num_iterations", 4),
    ("rl", ["--num_generations", "8"], "num_samples", 8),
    ("rl", ["--max_completion_length", "32"], "max_new_tokens", 32),
])
def test_the_trainers_names_set_nanochats_fields(stage, argv, field, value):
    """The recipe says nanochat's name, the command line the Trainer's: the command line wins."""
    run = PARSERS[stage](["--config", cpu(stage), *argv])
    assert getattr(run, field) == value and run.trainer_args == {}


def test_one_source_giving_both_names_two_values_is_refused(tmp_path):
    with pytest.raises(UsageError, match=r"--num_iterations 6 and --max_steps 5 set the same field \(num_iterations\)"):
        parse_args(["--num_iterations", "6", "--max_steps", "5"])
    assert parse_args(["--num_iterations", "5", "--max_steps", "5"]).num_iterations == 5
    recipe = tmp_path / "r.yaml"
    recipe.write_text("matrix_lr: 0.02\nlearning_rate: 0.03\n")
    with pytest.raises(UsageError, match=r"r.yaml: --matrix_lr 0.02 and --learning_rate 0.03"):
        parse_args(["--config", str(recipe)])


def test_max_steps_reaches_the_trainer():
    # pretraining's and midtraining's steps go through nanochat's plan (training_arguments sets them once it is made)
    assert parse_args(["--config", cpu("pretrain"), "--max_steps", "7"]).num_iterations == 7
    assert grpo_config(parse_rl_args(["--config", cpu("rl"), "--max_steps", "3"])).max_steps == 3
    run = parse_sft_args(["--config", cpu("sft"), "--max_steps", "9"])
    assert sft_config(run, max_length=256, eval_set=None).max_steps == 9


@pytest.mark.parametrize(("stage", "argv", "message"), [
    ("pretrain", ["--gradient_accumulation_steps", "4"], "--total_batch_size"),
    ("pretrain", ["--lr_scheduler_type", "cosine"], "--warmdown_ratio"),
    ("pretrain", ["--adam_beta1", "0.9"], "--matrix_lr"),
    ("pretrain", ["--num_train_epochs", "2"], "--num_iterations"),
    ("sft", ["--packing", "true"], "--pipeline"),
    ("sft", ["--gradient_accumulation_steps", "2"], "--target_examples_per_step"),
    ("rl", ["--steps_per_generation", "2"], "--examples_per_step"),
    ("rl", ["--optim", "adamw_torch"], "Muon"),
])
def test_fields_the_stage_derives_are_refused(stage, argv, message):
    with pytest.raises(UsageError) as err:
        PARSERS[stage](argv)
    assert str(err.value).startswith(f"{argv[0]}: set by this stage") and message in str(err.value)


@pytest.mark.parametrize(("stage", "classes"), [("pretrain", ("PretrainArguments", "TrainingArguments")),
                                                ("midtrain", ("MidtrainArguments", "TrainingArguments")),
                                                ("sft", ("SFTArguments", "SFTConfig")),
                                                ("rl", ("RLArguments", "GRPOConfig")),
                                                ("eval", ("EvalArguments",))])
def test_help_lists_every_field_with_its_default(stage, classes, capsys, monkeypatch):
    import dataclasses

    import transformers
    import trl

    from nanochat_hf import cli
    from nanochat_hf.evaluation import evaluate
    from nanochat_hf.training import midtrain, pretrain, rl, sft

    monkeypatch.setenv("COLUMNS", "2000")  # one line per option
    with pytest.raises(SystemExit) as exit:
        cli.main([stage, "--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    modules = (pretrain, midtrain, sft, rl, evaluate, transformers, trl)
    for cls in (next(getattr(m, c) for m in modules if hasattr(m, c)) for c in classes):
        for f in dataclasses.fields(cls):
            if f.init and f.name != "trainer_args":
                assert f"--{f.name}" in text, (cls.__name__, f.name)
    lines: dict[str, str] = {}  # option -> its entry (the option line and the help under it)
    option = None
    for line in text.split("\n\n", 1)[1].splitlines():
        if line.startswith("  -"):
            option = line.split()[0].rstrip(",")
            lines[option] = line
        elif option is not None:
            lines[option] += line
    expected = {"pretrain": {"--depth": "(default: 20)", "--max_grad_norm": "(default: 0.0)",
                             "--project": "(default: nanochat)", "--max_steps": "same as --num_iterations"},
                "midtrain": {"--init_from": "(default: runs/d20/pretrain/final)"},
                "sft": {"--activation_checkpointing": "(default: False)", "--learning_rate": "same as --matrix_lr",
                        "--packing": "set by this stage"},
                "rl": {"--beta": "(default: 0.0)", "--loss_type": "(default: bnpo)",
                       "--num_iterations": "(default: -1)"},
                "eval": {"--max_per_task": "(default: -1)", "--bpb_tokens": "(default: 20971520)"}}[stage]
    for option, fragment in expected.items():
        assert fragment in lines[option], lines[option]


# ---------------------------------------------------------------------------------------------------------------
# trackio and wandb


class _Recorder(dict):
    def update(self, *args, **kwargs):  # the config the callbacks log: nothing to check here
        pass


def test_trackio_gets_the_project_and_run_name(monkeypatch):
    from transformers import TrainerState
    from transformers.integrations import integration_utils

    received = {}
    fake = types.SimpleNamespace(init=lambda **kw: received.update(kw), config=_Recorder(),
                                 context_vars=types.SimpleNamespace(current_space_id=types.SimpleNamespace(
                                     get=lambda: None)))
    monkeypatch.setitem(sys.modules, "trackio", fake)
    monkeypatch.setattr(integration_utils, "is_trackio_available", lambda: True)
    run = parse_sft_args(["--config", cpu("sft"), "--report_to", "trackio", "--project", "nanochat-tests",
                          "--run_name", "cpu-sft-1"])
    args = sft_config(run, max_length=256, eval_set=None)
    integration_utils.TrackioCallback().setup(args, TrainerState(), model=None)
    assert (received["project"], received["name"]) == ("nanochat-tests", "cpu-sft-1")


def test_wandb_gets_the_project_and_run_name(monkeypatch):
    from transformers import TrainerState
    from transformers.integrations import integration_utils

    received = {}
    fake = types.ModuleType("wandb")

    def init(**kwargs):
        received.update(kwargs)
        fake.run = types.SimpleNamespace(_label=lambda **kw: None)

    fake.run, fake.init, fake.config, fake.termwarn = None, init, _Recorder(), lambda *a, **k: None
    config_util = types.ModuleType("wandb.sdk.lib.config_util")
    config_util.ConfigError = RuntimeError
    for name, module in (("wandb", fake), ("wandb.sdk", types.ModuleType("wandb.sdk")),
                         ("wandb.sdk.lib", types.ModuleType("wandb.sdk.lib")), ("wandb.sdk.lib.config_util", config_util)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(integration_utils, "is_wandb_available", lambda: True)
    monkeypatch.setenv("WANDB_PROJECT", "somebody-elses")
    run = parse_rl_args(["--config", cpu("rl"), "--report_to", "wandb", "--project", "nanochat-tests",
                         "--run_name", "cpu-rl-1"])
    integration_utils.WandbCallback().setup(grpo_config(run), TrainerState(), model=None)
    assert (received["project"], received["name"]) == ("nanochat-tests", "cpu-rl-1")

    # no project given: the stage's (nanochat's) fills an unset WANDB_PROJECT, a set one is the user's
    monkeypatch.delenv("WANDB_PROJECT")
    grpo_config(parse_rl_args(["--config", cpu("rl"), "--report_to", "wandb"]))
    import os

    assert os.environ["WANDB_PROJECT"] == "nanochat-rl"
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    grpo_config(parse_rl_args(["--config", cpu("rl"), "--report_to", "wandb"]))
    assert os.environ["WANDB_PROJECT"] == "mine"


# ---------------------------------------------------------------------------------------------------------------
# --push_to_hub


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """huggingface_hub's network calls, recorded: each uploaded folder is copied aside as it was uploaded."""
    from huggingface_hub import HfApi, RepoUrl

    calls = {"create_repo": [], "upload_folder": []}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"].append(repo_id)
        name = repo_id if "/" in repo_id else f"someone/{repo_id}"
        return RepoUrl(f"https://huggingface.co/{name}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        kept = tmp_path / "uploads" / str(len(calls["upload_folder"]))
        shutil.copytree(folder_path, kept)
        calls["upload_folder"].append({"repo_id": repo_id, "folder": kept, **kwargs})
        return types.SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_to_hub_uploads_a_loadable_folder_with_our_card(tiny_checkpoint, tmp_path, hub):
    from transformers import AutoModelForCausalLM

    from nanochat_hf.training import sft

    data = write_jsonl(tmp_path / "conversations.jsonl", conversations(8))
    sft.main(["--config", cpu("sft"), "--init_from", str(tiny_checkpoint), "--output_dir", str(tmp_path / "run"),
              "--conversations", str(data), "--eval_every", "-1", "--max_steps", "1", "--device_batch_size", "2",
              "--target_examples_per_step", "2", "--push_to_hub", "--hub_model_id", "someone/tiny-sft"])
    assert hub["create_repo"] == ["someone/tiny-sft"]
    (upload,) = hub["upload_folder"]
    assert upload["repo_id"] == "someone/tiny-sft"
    folder = upload["folder"]
    card = (folder / "README.md").read_text()
    assert "nanochat-hf" in card and "someone/tiny-sft" in card
    assert "This model is a fine-tuned version" not in card
    assert {"modeling_nanochat.py", "configuration_nanochat.py", "tokenizer.json", "model.safetensors"} <= {
        p.name for p in folder.iterdir()}
    assert json.loads((folder / "config.json").read_text())["auto_map"]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final", trust_remote_code=True)
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), final.state_dict().values(), strict=True))


def test_pretraining_pushes_each_checkpoint_and_the_final_model(tiny_checkpoint, tmp_path, hub):
    from nanochat_hf.data.embedded import embedded_corpus
    from nanochat_hf.training import pretrain

    (tmp_path / "corpus").mkdir()
    write_jsonl(tmp_path / "corpus" / "shard.jsonl", [{"text": d} for d in embedded_corpus(max_chars=60_000)])
    pretrain.main(["--config", cpu("pretrain"), "--tokenizer", str(tiny_checkpoint), "--dataset",
                   str(tmp_path / "corpus"), "--output_dir", str(tmp_path / "run"), "--depth", "1", "--max_seq_len",
                   "64", "--device_batch_size", "2", "--total_batch_size", "128", "--max_steps", "2",
                   "--eval_every", "-1", "--torch_compile", "false", "--push_to_hub", "--hub_strategy", "checkpoint",
                   "--hub_token", "hf_not_a_real_token"])
    # no --hub_model_id: the Trainer names the repo after the output folder, in the token's namespace
    assert hub["create_repo"] == ["run"]
    uploads = hub["upload_folder"]
    assert [u["commit_message"] for u in uploads] == ["Training in progress, step 2",
                                                      "Training in progress, step 2, checkpoint", "End of training"]
    assert {u["repo_id"] for u in uploads} == {"someone/run"} and uploads[1]["path_in_repo"] == "last-checkpoint"
    for upload in (uploads[0], uploads[2]):
        card = (upload["folder"] / "README.md").read_text()
        assert "nanochat-hf" in card and "This model is a fine-tuned version" not in card
        assert (upload["folder"] / "modeling_nanochat.py").is_file()
    # the whole checkpoint, to resume from: the Trainer's state and the stream's
    assert {"trainer_state.json", "data_state_rank0.json"} <= {p.name for p in uploads[1]["folder"].iterdir()}
    record = json.loads((tmp_path / "run" / "final" / "run_args.json").read_text())
    assert record["arguments"]["trainer_args"] == {"push_to_hub": True, "hub_strategy": "checkpoint"}  # no token
