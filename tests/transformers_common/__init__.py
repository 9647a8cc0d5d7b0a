"""transformers' common model tests, vendored from the transformers 5.24.0 sdist (Apache-2.0); see
tests/test_transformers_common.py."""
