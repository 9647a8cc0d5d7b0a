"""Inference: the engine (KV cache, tool use), the tools (calculator, sandboxed python), the terminal chat and the local Space server."""
