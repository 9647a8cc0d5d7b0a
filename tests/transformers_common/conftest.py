# The vendored files are mixins, imported by tests/test_transformers_common.py; nothing here is collected itself.
collect_ignore_glob = ["*.py", "*/*.py"]
