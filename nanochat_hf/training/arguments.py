"""A stage's arguments from a recipe and the command line, the way TRL's and open-r1's scripts read them.

    nanochat-hf sft --config recipes/d20/sft.yaml --max_steps 100 --run_name try-1 --report_to trackio

Two dataclasses make one command line: the stage's own (depth, data, generation, tier, nanochat's hyper-parameters)
and the Trainer's config (``TrainingArguments``, ``SFTConfig`` or ``GRPOConfig``), every field of which can be set.
The rules (:func:`parse_stage_args`):

* Sources, weakest first: the field's default, the recipe (``--config FILE`` or ``--config=FILE``), the command line.
* nanochat's settings of the Trainer's own fields (no gradient clipping, no activation checkpointing, ...) are the
  defaults ``--help`` shows; a value in the recipe or on the command line replaces them.
* A name both dataclasses have (``output_dir``, ``seed``, ``report_to``, ``bf16``, ``weight_decay``, ...) is one
  option, declared by the stage's dataclass; the stage hands it on to the Trainer.
* The Trainer's name of a setting the stage holds under nanochat's name is an alias (``--max_steps`` sets
  ``num_iterations``, ``--learning_rate`` sets ``matrix_lr``); one source giving both names two values is refused.
* Fields the stage derives (the gradient accumulation from the total batch, the LR schedule, the optimizer, ...)
  are refused, with the field to set instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, get_type_hints

import yaml
from transformers import HfArgumentParser

from ..errors import UsageError

# the dataclass field that carries the Trainer-config fields given in the recipe or on the command line
TRAINER_ARGS = "trainer_args"
# transformers 5's deprecated names: a default of the new name must not hide a user's value of the old one
_SYNONYMS = {"gradient_checkpointing": "activation_checkpointing",
             "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs"}
_OPTIMIZER = ("nanochat's Muon + AdamW (with its own betas and eps) replaces the Trainer's optimizer; set its LRs "
              "with --matrix_lr, --embedding_lr, --unembedding_lr, --scalar_lr")
_SCHEDULE = "nanochat's LR schedule replaces the Trainer's; shape it with --warmdown_ratio and --final_lr_frac"
# what the stages do beyond the Trainer with some of its fields, said in their help
_NOTES = {"project": "The stages also hand it to wandb (as WANDB_PROJECT).",
          "push_to_hub": "The stages push nanochat-hf's repo folder: weights, model code, tokenizer, model card."}
# the Trainer's optimizer and schedule fields, which every stage replaces with nanochat's
OPTIMIZER_FIELDS = {
    **dict.fromkeys(("optim", "optim_args", "optim_target_modules", "adam_beta1", "adam_beta2", "adam_epsilon"),
                    _OPTIMIZER),
    **dict.fromkeys(("lr_scheduler_type", "lr_scheduler_kwargs"), _SCHEDULE),
}


@dataclasses.dataclass(frozen=True)
class TrainerFields:
    """How a stage treats the fields of its Trainer config."""

    config_cls: type  # TrainingArguments, SFTConfig or GRPOConfig
    aliases: dict[str, str]  # the Trainer's name -> the stage's field that holds that setting
    defaults: dict[str, Any]  # nanochat's settings of the Trainer's own fields; a given value wins
    owned: dict[str, str]  # fields the stage derives -> why, and what to set instead


def read_recipe(path: str) -> dict:
    """A recipe YAML file: a mapping of field names to values (an empty file is an empty recipe)."""
    if not Path(path).is_file():
        raise UsageError(f"--config {path}: no such file; pass a recipe such as recipes/cpu/pretrain.yaml")
    try:
        recipe = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        # the line where the broken construct starts (its context), else where the parser gave up
        where = getattr(err, "context_mark", None) or getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        problem = ": ".join(filter(None, (getattr(err, "context", None), getattr(err, "problem", None)))) or err
        raise UsageError(f"--config {path}: not valid YAML{line} ({problem}); fix the file") from err
    except UnicodeDecodeError as err:
        raise UsageError(f"--config {path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    if not isinstance(recipe, dict):
        raise UsageError(f"--config {path}: holds a {type(recipe).__name__}, not `field: value` lines")
    return recipe


def split_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """Take `--config FILE` or `--config=FILE` out of `argv`: (the file or None, the rest)."""
    path, rest, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" or arg.startswith("--config="):
            if arg == "--config":
                value = argv[i + 1] if i + 1 < len(argv) else ""
                i += 2
            else:
                value = arg.removeprefix("--config=")
                i += 1
            if not value or value.startswith("-"):
                raise UsageError("--config: expected a recipe file, e.g. --config recipe.yaml or --config=recipe.yaml")
            if path is not None:
                raise UsageError(f"--config {path} and --config {value}: give one recipe")
            path = value
            continue
        rest.append(arg)
        i += 1
    return path, rest


class StageParser(HfArgumentParser):
    """HfArgumentParser over the stage's dataclass and its Trainer config, one argument group each. A Trainer
    field that the stage's dataclass already declares is left out (one option, the stage's); the help of the others
    says what the stage does with them."""

    def __init__(self, arguments_cls: type, trainer: TrainerFields | None = None, **kwargs):
        self.trainer = trainer
        kwargs.setdefault("epilog", "A recipe (--config FILE or --config=FILE) sets any of these fields by name; the "
                          "command line overrides it.")
        classes = [arguments_cls] if trainer is None else [arguments_cls, trainer.config_cls]
        super().__init__(classes, **kwargs)
        if trainer is not None:
            self._describe_trainer_fields(trainer)

    def _add_dataclass_arguments(self, dtype: type) -> None:
        group = self.add_argument_group(f"{dtype.__name__} ({dtype.__module__.split('.')[0]})")
        hints = get_type_hints(dtype)
        for field in dataclasses.fields(dtype):
            if not field.init or field.name == TRAINER_ARGS or f"--{field.name}" in self._option_string_actions:
                continue
            field.type = hints[field.name]
            self._parse_dataclass_field(group, field)

    def _describe_trainer_fields(self, trainer: TrainerFields) -> None:
        for action in self._actions:
            name = action.dest
            if name in trainer.aliases:
                action.help, action.default = f"same as --{trainer.aliases[name]}", argparse.SUPPRESS
            elif name in trainer.owned:
                action.help, action.default = f"set by this stage: {trainer.owned[name]}", argparse.SUPPRESS
            elif name in trainer.defaults and f"--{name}" in action.option_strings:
                action.default = trainer.defaults[name]
                action.help = f"{action.help or ''} [nanochat's setting]".strip()
            if name in _NOTES and f"--{name}" in action.option_strings:
                action.help = f"{action.help or ''} {_NOTES[name]}".strip()

    def given(self, argv: list[str]) -> dict[str, Any]:
        """The fields `argv` names, typed by their options (an option left out is absent, not its default)."""
        saved = [(action, action.default, action.required) for action in self._actions]
        for action in self._actions:
            action.default, action.required = argparse.SUPPRESS, False
        try:
            namespace, unknown = self.parse_known_args(argv)
        finally:
            for action, default, required in saved:
                action.default, action.required = default, required
        if unknown:
            raise UsageError(f"{' '.join(unknown)}: not an argument of {self.prog}; `{self.prog} --help` lists them")
        return vars(namespace)

    def recipe_values(self, recipe: dict, path: str) -> dict[str, Any]:
        """The recipe's fields, each typed by its option as if given on the command line."""
        unknown = sorted(key for key in recipe if f"--{key}" not in self._option_string_actions)
        if unknown:
            raise UsageError(f"{path}: unknown keys {unknown}; see `{self.prog} --help` for the fields")
        argv, as_is = [], {}
        for key, value in recipe.items():
            if value is None:
                continue
            action = self._option_string_actions[f"--{key}"]
            if isinstance(value, dict):  # a JSON-valued field (model_init_kwargs, generation_kwargs, ...)
                as_is[action.dest] = value
            elif isinstance(value, list):
                if action.nargs not in ("+", "*"):
                    raise UsageError(f"{path}: {key} takes one value, not a list")
                argv += [f"--{key}", *map(str, value)]
            else:
                argv += [f"--{key}", str(value)]
        return {**self.given(argv), **as_is}


def _canonical(values: dict[str, Any], aliases: dict[str, str], source: str) -> dict[str, Any]:
    """`values` under the stage's names; two names of one field with two values in one source are refused."""
    out: dict[str, Any] = {}
    named: dict[str, str] = {}
    for name, value in values.items():
        target = aliases.get(name, name)
        if target in out and out[target] != value:
            raise UsageError(f"{source}: --{named[target]} {out[target]} and --{name} {value} set the same field "
                             f"({target}); give one")
        out[target], named[target] = value, name
    return out


def parse_stage_args(argv: Iterable[str] | None, arguments_cls: type, trainer: TrainerFields | None = None, *,
                     prog: str, description: str):
    """The stage's dataclass from `argv` (default sys.argv[1:]); with `trainer`, the fields of its Trainer config
    given go into the dataclass's `trainer_args`. `--help` prints every field with its default and exits."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path, argv = split_config(argv)
    parser = StageParser(arguments_cls, trainer, prog=prog, description=description)
    if any(arg in ("-h", "--help") for arg in argv):
        parser.print_help()
        raise SystemExit(0)
    aliases = trainer.aliases if trainer is not None else {}
    values = {}
    if path is not None:
        values = _canonical(parser.recipe_values(read_recipe(path), path), aliases, path)
    values.update(_canonical(parser.given(argv), aliases, "the command line"))
    own = {f.name for f in dataclasses.fields(arguments_cls) if f.init and f.name != TRAINER_ARGS}
    for name in values.keys() - own:
        if trainer is not None and name in trainer.owned:
            raise UsageError(f"--{name}: set by this stage: {trainer.owned[name]}")
    missing = [f.name for f in dataclasses.fields(arguments_cls) if f.init and f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UsageError(f"--{missing[0]} is required (on the command line or in the recipe)")
    kwargs = {name: value for name, value in values.items() if name in own}
    if trainer is not None:
        kwargs[TRAINER_ARGS] = {name: value for name, value in values.items() if name not in own}
    return arguments_cls(**kwargs)


def trainer_config(run, stage_values: dict[str, Any], defaults: dict[str, Any] | None = None):
    """The Trainer config of `run`, as its class's `trainer_fields` says: nanochat's defaults (and these
    `defaults`, known only at run time), then the fields the run gives (`run.trainer_args`), then what the stage
    derives from its own fields (`stage_values`), which nothing given may contradict."""
    trainer: TrainerFields = type(run).trainer_fields
    given = getattr(run, TRAINER_ARGS)
    known = {f.name for f in dataclasses.fields(trainer.config_cls) if f.init}
    for name in given:
        if name not in known:
            raise UsageError(f"--{name}: not a field of {trainer.config_cls.__name__}")
        if name in trainer.aliases:
            raise UsageError(f"--{name}: set it as {trainer.aliases[name]} (the stage's name for it)")
        if name in trainer.owned or name in stage_values:
            raise UsageError(f"--{name}: set by this stage: {trainer.owned.get(name, 'from its own fields')}")
    settings = {**trainer.defaults, **(defaults or {})}
    for old, new in _SYNONYMS.items():
        if old in given and new not in given:
            settings.pop(new, None)
    return trainer.config_cls(**{**settings, **given, **stage_values})


def hand_project_to_wandb(run, args) -> None:
    """transformers' wandb callback reads the project from WANDB_PROJECT alone (trackio's reads `args.project`):
    a project given in the recipe or on the command line goes there; the stage's default only fills an unset one."""
    if "wandb" not in (args.report_to or []):
        return
    if "project" in getattr(run, TRAINER_ARGS):
        os.environ["WANDB_PROJECT"] = args.project
    else:
        os.environ.setdefault("WANDB_PROJECT", args.project)
