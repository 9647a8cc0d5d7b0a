"""Stand-in for transformers' tests/generation/test_utils.py, which the 5.24.0 sdist does not carry (it ships only
the top-level tests/*.py): no GenerationTesterMixin tests run; tests/test_generation_modes.py covers
the same ground."""


class GenerationTesterMixin:
    pass
