"""`nanochat-hf push`: publish a checkpoint folder to the Hub as one commit, and optionally its chat Space.

Everything that will be uploaded is first written to a local staging folder by :func:`stage_model_repo` and
:func:`stage_space_repo`; the tests build the same folders with the same functions. Nothing touches the network
until both folders are complete, and each repository then receives exactly one commit (`HfApi.upload_folder`),
so a failure leaves the repository as it was.

The model card (README.md) is built by :mod:`nanochat_hf.hub.model_card` from the run's own records (the run
folder: the model folder's parent holding speedrun.json, or ``--run-dir``), the evaluation results and the report
card; the report (cleaned of local paths and log residue) and its plots (``report/*.png``) are uploaded beside it.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..output_folder import check_output_folder, staged_folder
from .model_card import (
    PACKAGE_DIR,
    build_model_card,
    find_report,
    find_results_files,
    find_run_dir,
    local_roots,
    publishable_report,
    read_results,
    read_run,
    report_images,
)

logger = logging.getLogger(__name__)

# The Space sources live in the checkout (like recipes/), not in the installed package.
SPACE_SOURCE = PACKAGE_DIR.parent / "spaces"
CODE_FILES = ("configuration_nanochat.py", "modeling_nanochat.py")
AUTO_MAP = {
    "AutoConfig": "configuration_nanochat.NanoChatConfig",
    "AutoModelForCausalLM": "modeling_nanochat.NanoChatForCausalLM",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json")
# Vendored into the Space as the package `nanochat_engine`: the Space runs without nanochat_hf installed.
ENGINE_FILES = ("inference/engine.py", "inference/tools.py")
VENDORED_PACKAGE = "nanochat_engine"
SPACE_CONFIG = "space_config.json"


class HubError(RuntimeError):
    """The push cannot go ahead (no token, no network, refused by the Hub); nothing was committed."""


@dataclass(frozen=True)
class PushResult:
    model_url: str
    commit_url: str
    space_url: str | None = None


# ---------------------------------------------------------------------------------------------------------------
# Staging: the exact folders that are uploaded


def _link_or_copy(src: Path, dst: Path, link: bool) -> None:
    # Weights can be gigabytes: a hard link costs nothing, and `push` only reads it and deletes its folder. A folder
    # the user keeps (--dry-run) gets copies, or changing a file in one would change it in the other.
    if link:
        with contextlib.suppress(OSError):
            os.link(src, dst)
            return
    shutil.copy2(src, dst)


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{model_dir}: the shard index names missing files {missing}")
        return [index] + [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    if any(model_dir.glob("*.bin")):
        raise ValueError(f"{model_dir} holds PyTorch .bin weights only; load it and save it again with "
                         "save_pretrained (which writes safetensors) before pushing.")
    raise FileNotFoundError(f"{model_dir} has no model.safetensors: pass a folder written by save_pretrained "
                            "(e.g. the `final` folder of a training run).")


def _num_parameters(weight_files: Sequence[Path]) -> int:
    from safetensors import safe_open

    total = 0
    for path in weight_files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    numel = 1
                    for dim in f.get_slice(name).get_shape():
                        numel *= dim
                    total += numel
    return total


def _read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: pass a folder written by save_pretrained.")
    config = json.loads(path.read_text())
    if config.get("model_type") != "nanochat_hf":
        raise ValueError(f"{path} has model_type {config.get('model_type')!r}, not 'nanochat_hf'; this command "
                         "publishes nanochat-hf checkpoints (convert others with `nanochat-hf convert`).")
    return config


def _check_tokenizer(model_dir: Path) -> list[Path]:
    files = [model_dir / name for name in TOKENIZER_FILES if (model_dir / name).is_file()]
    names = {p.name for p in files}
    if not {"tokenizer.json", "tokenizer_config.json"} <= names:
        raise FileNotFoundError(f"{model_dir} has no tokenizer (tokenizer.json + tokenizer_config.json): save the "
                                "tokenizer into the model folder with tokenizer.save_pretrained(folder).")
    inline_template = "chat_template" in json.loads((model_dir / "tokenizer_config.json").read_text())
    if not ({"chat_template.jinja", "chat_template.json"} & names or inline_template):
        raise ValueError(f"{model_dir} has no chat template; re-save the tokenizer from "
                         "nanochat_hf.tokenizer.bpe.load_tokenizer, which carries nanochat's template.")
    return files


def _generation_config(model_dir: Path, config: dict) -> dict:
    path = model_dir / "generation_config.json"
    if path.is_file():
        return json.loads(path.read_text())
    # nanochat stops on <|assistant_end|> and on <|bos|> (a base model starting a new document)
    eos = config.get("eos_token_id")
    stops = [eos] if isinstance(eos, int) else list(eos or [])
    if config.get("bos_token_id") is not None and config["bos_token_id"] not in stops:
        stops.append(config["bos_token_id"])
    return {"bos_token_id": config.get("bos_token_id"), "eos_token_id": stops, "pad_token_id": config.get("pad_token_id")}


def stage_model_repo(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    repo_id: str,
    *,
    results_files: Sequence[str | os.PathLike] | None = None,
    report_file: str | os.PathLike | None = None,
    run_dir: str | os.PathLike | None = None,
    datasets: Sequence[str] | None = None,
    license: str = "mit",
    space_id: str | None = None,
    link_weights: bool = False,
) -> Path:
    """Write into the new folder `out_dir` exactly what `push` uploads to the model repo `repo_id`.

    Weights (safetensors), config.json with `auto_map`, the model code from this package, the tokenizer and chat
    template, generation_config.json, the model card (README.md: see :mod:`.model_card`) and, where there is one,
    the report card (report.md) with its plots (report/*.png). The training facts come from the run folder
    `run_dir` (default: the model folder's parent when it holds speedrun.json); `datasets` replaces the Hub datasets
    read from it. The weights are copied, or hard-linked with `link_weights` (for a throwaway folder: they share
    their bytes).
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder {model_dir} does not exist")
    _check_repo_id(repo_id, "--repo-id")
    if run_dir is not None and not (Path(run_dir) / "speedrun.json").is_file():
        raise FileNotFoundError(f"run folder {run_dir} has no speedrun.json: pass the folder `nanochat-hf speedrun "
                                "--run-dir` wrote")
    run_dir = Path(run_dir) if run_dir is not None else find_run_dir(model_dir)
    run = read_run(run_dir, model_dir) if run_dir is not None else None
    config = _read_config(model_dir)
    weights = _weight_files(model_dir)
    tokenizer_files = _check_tokenizer(model_dir)
    if results_files is None:
        results_files = find_results_files(model_dir)
    else:
        for path in results_files:
            if not Path(path).is_file():
                raise FileNotFoundError(f"results file {path} does not exist")
    if report_file is not None and not Path(report_file).is_file():
        raise FileNotFoundError(f"report file {report_file} does not exist")
    report_path = Path(report_file) if report_file is not None else find_report(model_dir, run_dir)
    results = read_results([Path(p) for p in results_files])

    roots = local_roots(run_dir)
    report, images = None, {}
    if report_path is not None:
        report, images = report_images(report_path.read_text(encoding="utf-8", errors="replace"), report_path.parent)
        report = publishable_report(report, roots)
    card = build_model_card(repo_id, config, _num_parameters(weights), results, run, report, datasets, license,
                            space_id, roots)

    out_dir.mkdir(parents=True, exist_ok=False)
    try:
        for path in weights + tokenizer_files:
            _link_or_copy(path, out_dir / path.name, link_weights)
        for name in CODE_FILES:
            shutil.copy2(PACKAGE_DIR / name, out_dir / name)
        # --- custom_generate (issue 17 §3): the calculator tool loop for generate() and pipeline ---
        from ..custom_generate import stage_custom_generate

        stage_custom_generate(out_dir)
        # --- end custom_generate ---
        config["auto_map"] = dict(AUTO_MAP)
        (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        generation = _generation_config(model_dir, config)
        (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
        card.save(out_dir / "README.md")
        if report is not None:
            (out_dir / "report.md").write_text(report, encoding="utf-8")
        for link, path in images.items():
            (out_dir / link).parent.mkdir(exist_ok=True)
            shutil.copy2(path, out_dir / link)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return out_dir


def _check_imports(path: Path, allowed: set[str]) -> None:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules = [node.module or ""]
        else:
            continue
        for module in modules:
            top = module.split(".")[0]
            if top not in allowed and top not in sys.stdlib_module_names:
                raise ValueError(f"{path} imports {module!r}, which a Space without nanochat_hf cannot import; "
                                 "engine.py/tools.py may import only the standard library, torch, transformers and "
                                 "each other (relatively).")


def stage_space_repo(out_dir: str | os.PathLike, model_repo_id: str, source: str | os.PathLike = SPACE_SOURCE) -> Path:
    """Write into the new folder `out_dir` the Space: app.py, requirements.txt, README.md pointed at
    `model_repo_id` (its `models:` metadata and space_config.json) and the engine vendored as `nanochat_engine/`."""
    from huggingface_hub import SpaceCard

    source, out_dir = Path(source), Path(out_dir)
    needed = [source / name for name in ("app.py", "requirements.txt", "README.md")]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"Space sources {missing} not found: run from a checkout of nanochat-hf "
                                "(the Space lives in its spaces/ folder).")
    engine = [PACKAGE_DIR / name for name in ENGINE_FILES]
    absent = [str(p) for p in engine if not p.is_file()]
    if absent:
        raise FileNotFoundError(f"{absent} not found: the Space streams through nanochat_hf.inference.engine")
    for path in engine:
        _check_imports(path, {"torch", "transformers"})

    card = SpaceCard.load(source / "README.md")
    card.data.models = [model_repo_id]

    out_dir.mkdir(parents=True, exist_ok=False)
    try:
        shutil.copy2(source / "app.py", out_dir / "app.py")
        shutil.copy2(source / "requirements.txt", out_dir / "requirements.txt")
        card.save(out_dir / "README.md")
        (out_dir / SPACE_CONFIG).write_text(json.dumps({"model": model_repo_id}, indent=2) + "\n")
        package = out_dir / VENDORED_PACKAGE
        package.mkdir()
        for path in engine:
            shutil.copy2(path, package / path.name)
        (package / "__init__.py").write_text(
            '"""nanochat-hf\'s inference engine, vendored by `nanochat-hf push`."""\n\n'
            "from .engine import Engine\n\n__all__ = [\"Engine\"]\n"
        )
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return out_dir


# ---------------------------------------------------------------------------------------------------------------
# Pushing


def _check_repo_id(repo_id: str, flag: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"{flag} {repo_id!r} is not a valid repo id: {err}") from err
    if repo_id.count("/") != 1:
        raise ValueError(f"{flag} {repo_id!r} must be USER/NAME (or ORG/NAME)")


def _network_error_types() -> tuple[type[BaseException], ...]:
    import httpx

    return (httpx.TransportError, OSError)


def _hub_call(what: str, endpoint: str, fn):
    """Run one Hub request, turning transport and HTTP failures into a HubError that says what to do."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return fn()
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status in (401, 403):
            raise HubError(f"{what}: the Hub refused the token ({status}); use a token with write access "
                           "(`hf auth login`, or HF_TOKEN).") from err
        raise HubError(f"{what}: the Hub answered {status}: {err}") from err
    except _network_error_types() as err:
        raise HubError(f"{what}: cannot reach the Hub at {endpoint} ({err}); check the network "
                       "(or HF_ENDPOINT) and try again. Nothing was pushed.") from err


def push(
    model_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    space_id: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    results_files: Sequence[str | os.PathLike] | None = None,
    report_file: str | os.PathLike | None = None,
    run_dir: str | os.PathLike | None = None,
    datasets: Sequence[str] | None = None,
    license: str = "mit",
) -> PushResult:
    """Upload `model_dir` to `repo_id` in one commit; with `space_id` create or update the Space pointed at it."""
    from huggingface_hub import HfApi, constants, get_token

    _check_repo_id(repo_id, "--repo-id")
    if space_id is not None:
        _check_repo_id(space_id, "--space")
    if constants.HF_HUB_OFFLINE:
        raise HubError("HF_HUB_OFFLINE is set: unset it to push to the Hub. Nothing was pushed.")
    token = token or get_token()
    if not token:
        raise HubError("no Hugging Face token: run `hf auth login` or set HF_TOKEN to a token with write access. "
                       "Nothing was pushed.")
    endpoint = endpoint or constants.ENDPOINT
    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory(prefix="nanochat-hf-push-") as tmp:
        # both folders complete before the first request: a bad input fails here, with nothing sent
        model_folder = stage_model_repo(model_dir, Path(tmp) / "model", repo_id, results_files=results_files,
                                        report_file=report_file, run_dir=run_dir, datasets=datasets,
                                        license=license, space_id=space_id, link_weights=True)
        space_folder = stage_space_repo(Path(tmp) / "space", repo_id) if space_id else None
        user = _hub_call("checking the token", endpoint, api.whoami)
        logger.info("pushing as %s", user.get("name"))
        # both repos exist before the first commit: a Space name that is taken or refused stops the push early
        url = _hub_call(f"creating {repo_id}", endpoint,
                        lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"))
        space_url = None
        if space_folder is not None:
            space_url = str(_hub_call(f"creating the Space {space_id}", endpoint, lambda: api.create_repo(
                space_id, private=private, exist_ok=True, repo_type="space", space_sdk="gradio")))
        commit = _hub_call(f"uploading to {repo_id}", endpoint, lambda: api.upload_folder(
            repo_id=repo_id, folder_path=model_folder, repo_type="model",
            commit_message=f"Upload {Path(model_dir).name} with nanochat-hf"))
        if space_folder is not None:
            _hub_call(f"uploading the Space {space_id} (the model is pushed: {commit.commit_url})", endpoint,
                      lambda: api.upload_folder(repo_id=space_id, folder_path=space_folder, repo_type="space",
                                                commit_message=f"Chat with {repo_id}"))
    return PushResult(model_url=str(url), commit_url=commit.commit_url, space_url=space_url)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanochat-hf push",
        description="Publish a checkpoint folder to the Hugging Face Hub in one commit: safetensors weights, "
        "config.json with auto_map, the model code, tokenizer + chat template, generation_config.json and a model "
        "card with the report card and evaluation results. With --space, also create or update a Gradio Space that "
        "chats with the model. Needs a token (`hf auth login` or HF_TOKEN) and network.",
    )
    parser.add_argument("--model", required=True, help="checkpoint folder written by save_pretrained")
    parser.add_argument("--repo-id", required=True, help="model repo, USER/NAME")
    parser.add_argument("--private", action="store_true", help="create the repo (and Space) private")
    parser.add_argument("--space", help="also create/update this Space (USER/NAME) pointed at the model")
    parser.add_argument("--results", action="append", help="evaluation results JSON (repeatable; default: "
                        "*result*.json in and beside the model folder)")
    parser.add_argument("--report", help="report card markdown (default: report.md of the run folder, else in or "
                        "beside the model folder)")
    parser.add_argument("--run-dir", help="the speedrun folder that trained the model, whose records the card reports "
                        "(default: the model folder's parent when it holds speedrun.json)")
    parser.add_argument("--dataset", action="append", help="training dataset id for the card metadata (repeatable; "
                        "default: the Hub datasets the run's records name, none without a run folder)")
    parser.add_argument("--license", default="mit", help="license in the card metadata (default mit)")
    parser.add_argument("--dry-run", metavar="OUT", help="write the folders that would be uploaded to OUT/model "
                        "(and OUT/space), weights copied, and stop; needs neither token nor network. OUT must be new "
                        "or empty")
    parser.add_argument("--overwrite", action="store_true", help="with --dry-run: replace OUT if it holds an earlier "
                        "dry run or another folder nanochat-hf wrote (never the current, home or model folder)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    datasets = tuple(args.dataset) if args.dataset else None
    try:
        if args.space:
            _check_repo_id(args.space, "--space")
        if args.dry_run:
            out = check_output_folder(args.dry_run, overwrite=args.overwrite, flag="--dry-run",
                                      inputs=[args.model, args.report, args.run_dir, *(args.results or [])])
            with staged_folder(out) as staged:
                if args.space:
                    stage_space_repo(staged / "space", args.repo_id)
                stage_model_repo(args.model, staged / "model", args.repo_id, results_files=args.results,
                                 report_file=args.report, run_dir=args.run_dir, datasets=datasets,
                                 license=args.license, space_id=args.space)
            print(f"staged the model repo in {out / 'model'}" + (f" and the Space in {out / 'space'}"
                                                                 if args.space else ""))
            return
        result = push(args.model, args.repo_id, private=args.private, space_id=args.space,
                      results_files=args.results, report_file=args.report, run_dir=args.run_dir, datasets=datasets,
                      license=args.license)
    except (HubError, ValueError, FileNotFoundError) as err:
        print(f"nanochat-hf push: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    print(f"pushed {result.model_url} ({result.commit_url})")
    if result.space_url:
        print(f"Space: {result.space_url}")


if __name__ == "__main__":
    main()
