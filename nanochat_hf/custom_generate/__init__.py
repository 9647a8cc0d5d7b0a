"""The `custom_generate/` folder a pushed model repo carries: generate.py and the calculator it calls."""

import shutil
from pathlib import Path

SOURCE = Path(__file__).parent
TOOLS = SOURCE.parent / "inference" / "tools.py"


def stage_custom_generate(repo_dir: str | Path) -> Path:
    """Write `custom_generate/generate.py` and its vendored `tools.py` into the model folder `repo_dir`."""
    target = Path(repo_dir) / "custom_generate"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(SOURCE / "generate.py", target / "generate.py")
    shutil.copy2(TOOLS, target / "tools.py")
    return target


__all__ = ["stage_custom_generate"]
