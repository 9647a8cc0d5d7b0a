"""The ``lighteval`` command line, with lighteval 0.13's import-time network calls kept from failing offline.

``python -m nanochat_hf.evaluation.lighteval_cli <lighteval arguments>`` is ``lighteval <lighteval arguments>``
plus two guards installed before lighteval builds its task registry (site-packages stays untouched):

1. lighteval imports every built-in task module to list tasks, and ``tasks/tiny_benchmarks.py`` fetches
   ``tinyBenchmarks.pkl`` from raw.githubusercontent.com while being imported, so an offline machine dies with a
   ConnectionError before any task runs. The guard lets that one request fail quietly (as a non-200 answer,
   which lighteval already tolerates); only the tinyBenchmarks tasks themselves then cannot run.
2. ``tasks/mt_bench`` calls ``HfApi().list_models(model_name=...)`` at import, which huggingface_hub 2.x rejects;
   the guard maps it to ``search=`` (a no-op with the huggingface_hub<2 this project pins).

Online, plain ``lighteval`` works as well; the results are the same.
"""

from __future__ import annotations

import importlib
import os
import sys

TINY_BENCHMARKS_URL = "https://raw.githubusercontent.com/felipemaiapolo/tinyBenchmarks/main/tinyBenchmarks/"


class _Unavailable:
    status_code = 503
    content = b""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no")


def install_offline_guards() -> None:
    """Idempotent; call before anything imports ``lighteval.tasks.registry``'s task modules."""
    import requests

    real_get = requests.get

    def guarded_get(url, *args, **kwargs):
        if isinstance(url, str) and url.startswith(TINY_BENCHMARKS_URL):
            if _offline():
                return _Unavailable()
            try:
                return real_get(url, *args, **{"timeout": 30, **kwargs})
            except requests.RequestException:
                return _Unavailable()
        return real_get(url, *args, **kwargs)

    requests.get = guarded_get
    try:
        importlib.import_module("lighteval.tasks.tasks.tiny_benchmarks")
    finally:
        requests.get = real_get

    import huggingface_hub

    if int(huggingface_hub.__version__.split(".")[0]) >= 2 and not getattr(
        huggingface_hub.HfApi.list_models, "_nanochat_guard", False
    ):
        real_list_models = huggingface_hub.HfApi.list_models

        def list_models(self, *args, model_name=None, **kwargs):
            if model_name is not None:
                kwargs.setdefault("search", model_name)
            return real_list_models(self, *args, **kwargs)

        list_models._nanochat_guard = True
        huggingface_hub.HfApi.list_models = list_models


def main(argv: list[str] | None = None) -> None:
    install_offline_guards()
    from lighteval.__main__ import app

    app(args=sys.argv[1:] if argv is None else argv, prog_name="lighteval")


if __name__ == "__main__":
    main()
