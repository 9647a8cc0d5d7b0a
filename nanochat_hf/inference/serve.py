"""`nanochat-hf serve --model DIR`: run the chat Space locally, from the same folder `nanochat-hf push` uploads.

The Space is staged into a temporary folder (app.py + the vendored engine) and its `main` runs there, so what runs
locally is what runs on the Hub. The model is `--model`, else NANOCHAT_MODEL, as on the Space; the options and their
NANOCHAT_* variables are the Space's (`nanochat-hf serve --help`).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

from ..hub.push import stage_space_repo


def _model_argument(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--model" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--model="):
            return arg.split("=", 1)[1]
    return None


def _check_model(model: str, source: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(model).exists():
        if not (Path(model) / "config.json").is_file():
            raise SystemExit(f"nanochat-hf serve: error: {model} ({source}) has no config.json; pass a folder "
                             "written by save_pretrained (e.g. runs/cpu/sft) or a Hub repo id")
        return
    try:
        validate_repo_id(model)
    except HFValidationError:
        raise SystemExit(f"nanochat-hf serve: error: model folder {model} ({source}) does not exist") from None


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    model, source = _model_argument(argv), "--model"
    if model is None and os.environ.get("NANOCHAT_MODEL"):
        model, source = os.environ["NANOCHAT_MODEL"], "NANOCHAT_MODEL"  # the app reads it too
    if {"-h", "--help"} & set(argv):
        pass  # the app's parser prints the help; no model needed
    elif model is None:
        raise SystemExit("nanochat-hf serve: error: --model DIR (a checkpoint folder or Hub repo id) or the "
                         "NANOCHAT_MODEL variable is required")
    else:
        _check_model(model, source)
    with tempfile.TemporaryDirectory(prefix="nanochat-hf-space-") as tmp:
        folder = stage_space_repo(Path(tmp) / "space", model or "local/model")
        spec = importlib.util.spec_from_file_location("nanochat_space_app", folder / "app.py")
        app = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(folder))  # the app imports its vendored `nanochat_engine`
        sys.modules[spec.name] = app  # dataclasses look their module up there
        try:
            spec.loader.exec_module(app)
            app.main(argv, prog="nanochat-hf serve")
        finally:
            sys.path.remove(str(folder))


if __name__ == "__main__":
    main()
