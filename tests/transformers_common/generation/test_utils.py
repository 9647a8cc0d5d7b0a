"""Stand-in for transformers' tests/generation/test_utils.py, which the 5.24.0 sdist does not carry (it ships only
the top-level tests/*.py): no GenerationTesterMixin tests run."""


class GenerationTesterMixin:
    pass
