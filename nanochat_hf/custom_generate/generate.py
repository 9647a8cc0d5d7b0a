# Ships to the Hub as custom_generate/generate.py, beside a copy of nanochat_hf/inference/tools.py: it imports only
# torch, transformers and that file.
"""nanochat's calculator tool loop as a transformers `custom_generate`.

`model.generate(..., custom_generate=<repo or folder>, trust_remote_code=True)` (and a model loaded with
`trust_remote_code=True`, whose `generate` transformers replaces with this one) runs transformers' own generation
with one logits processor added: when a generated `<|python_start|> expr <|python_end|>` block closes, the next
tokens are forced to `<|output_start|> result <|output_end|>`, exactly as nanochat_hf's Engine does.
"""

import torch
from transformers import AutoTokenizer, GenerationMixin, LogitsProcessor, LogitsProcessorList

from .tools import calculate

_TOOL_TOKENS = ("python_start", "python_end", "output_start", "output_end")


class CalculatorToolProcessor(LogitsProcessor):
    """Forces the calculator's answer after each `<|python_end|>`.

    Stateless: every step replays the Engine's tool state machine over each row's generated tokens, so it works
    for any batch layout transformers chooses (beam reordering included)."""

    def __init__(self, tokenizer, prompt_length: int, tool=calculate):
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.tool = tool
        self.ids = {}
        for name in _TOOL_TOKENS:
            token_id = tokenizer.convert_tokens_to_ids(f"<|{name}|>")
            if token_id is None or token_id == tokenizer.unk_token_id:
                raise ValueError(f"nanochat custom_generate: the tokenizer has no <|{name}|> token")
            self.ids[name] = token_id
        self._results = {}

    def _result(self, expression_ids: tuple[int, ...]) -> list[int]:
        if expression_ids not in self._results:
            result = self.tool(self.tokenizer.decode(list(expression_ids)))
            forced = []
            if result is not None:
                text = self.tokenizer.encode(str(result), add_special_tokens=False, split_special_tokens=True)
                forced = [self.ids["output_start"], *text, self.ids["output_end"]]
            self._results[expression_ids] = forced
        return self._results[expression_ids]

    def forced_tokens(self, generated: list[int]) -> list[int]:
        """The tokens still to be forced after `generated` (the Engine's `_advance_tool_state`, replayed)."""
        in_python, expression, forced = False, [], []
        for token in generated:
            if forced:
                forced.pop(0)
            if token == self.ids["python_start"]:
                in_python, expression = True, []
            elif token == self.ids["python_end"] and in_python:
                in_python = False
                forced.extend(self._result(tuple(expression)))
            elif in_python:
                expression.append(token)
        return forced

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row, ids in enumerate(input_ids[:, self.prompt_length :].tolist()):
            forced = self.forced_tokens(ids)
            if forced:
                scores[row] = torch.finfo(scores.dtype).min
                scores[row, forced[0]] = 0.0
        return scores


def generate(*args, model, input_ids: torch.LongTensor | None = None, generation_config=None, **kwargs):
    """transformers' `generate` with nanochat's calculator; takes every argument `generate` takes. The tokenizer
    comes from `tokenizer=` or else from the model's own folder or repo.

    `model` is keyword-only: transformers calls this as `generate(model=model, inputs=...)`, and as the model's own
    `generate` (a partial with `model=` bound) it is called like `model.generate(input_ids, ...)`."""
    kwargs.pop("custom_generate", None)
    kwargs.pop("trust_remote_code", None)
    if len(args) > 2:
        raise TypeError("nanochat custom_generate: pass arguments after `inputs, generation_config` by name")
    if args:
        input_ids = args[0]
        generation_config = args[1] if len(args) == 2 else generation_config
    if input_ids is None:
        input_ids = kwargs.pop("inputs", None)
    kwargs.pop("inputs", None)
    if input_ids is None:
        raise ValueError("nanochat custom_generate: pass the prompt as `input_ids` (token ids)")
    tokenizer = kwargs.get("tokenizer") or AutoTokenizer.from_pretrained(model.name_or_path)
    tool = CalculatorToolProcessor(tokenizer, input_ids.shape[1])
    processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
    processors.append(tool)
    # GenerationMixin.generate, not model.generate: the latter may be this function (transformers installs it as
    # the model's generate when loading with trust_remote_code=True).
    return GenerationMixin.generate(
        model, input_ids, generation_config=generation_config, logits_processor=processors, **kwargs
    )
