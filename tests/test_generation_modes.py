"""Every decoding mode of transformers' `generate()` on both generations, checked against an oracle outside
`generate` itself: full forwards without a cache, recomputed log-probabilities, or greedy decoding.

transformers' `GenerationTesterMixin` (tests/generation/test_utils.py) is not in the 5.24.0 sdist that
tests/transformers_common/ vendors from, so its ground is covered here instead, in our own words: cached vs uncached
decoding, scores and logits, hidden states and attentions per step, beam search and its scores, beam sampling,
multiple return sequences, assisted and prompt-lookup decoding, continuing from a returned cache, stopping at EOS,
and generation from `inputs_embeds`.
"""

import copy

import pytest
import torch

GENERATIONS = ["2025", "2026"]
PROMPT, NEW = 6, 12  # 18 tokens cross the 2026 short window of 8


def _ids(seed: int, batch: int = 2, length: int = PROMPT) -> torch.Tensor:
    return torch.randint(1, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


def _greedy_by_full_forwards(model, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy decoding with no cache at all: each step runs the whole sequence again."""
    logits_per_step = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(ids, use_cache=False).logits[:, -1]
            logits_per_step.append(logits)
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids, logits_per_step


def _sequence_logprob(model, sequence: torch.Tensor, prompt_len: int) -> float:
    """Sum of log p(token) over the generated part of one sequence, from one full forward."""
    with torch.no_grad():
        logprobs = model(sequence[None], use_cache=False).logits[0].float().log_softmax(-1)
    targets = sequence[prompt_len:]
    return logprobs[prompt_len - 1 : -1].gather(-1, targets[:, None]).sum().item()


@pytest.mark.parametrize("generation", GENERATIONS)
def test_greedy_with_and_without_cache_equals_full_forwards(tiny_model_factory, generation):
    model = tiny_model_factory(generation, seed=40)
    ids = _ids(40)
    expected, expected_logits = _greedy_by_full_forwards(model, ids, NEW)
    with torch.no_grad():
        cached = model.generate(
            ids,
            max_new_tokens=NEW,
            do_sample=False,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_logits=True,
            output_scores=True,
        )
        uncached = model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(cached.sequences, expected) and torch.equal(uncached, expected)
    assert len(cached.logits) == len(cached.scores) == NEW
    for step, (logits, reference) in enumerate(zip(cached.logits, expected_logits, strict=True)):
        torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5, msg=f"step {step}")
    # no logits processors are active in plain greedy decoding: the scores are the raw logits
    assert all(torch.equal(s, lg) for s, lg in zip(cached.scores, cached.logits, strict=True))


@pytest.mark.parametrize("generation", GENERATIONS)
def test_generate_returns_hidden_states_and_attentions_per_step(tiny_model_factory, generation):
    model = tiny_model_factory(generation, seed=41, attn_implementation="eager")
    layers = model.config.num_hidden_layers
    ids = _ids(41)
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_hidden_states=True,
            output_attentions=True,
        )
        full = model(out.sequences[:, :-1], output_hidden_states=True, output_attentions=True, use_cache=False)
    assert len(out.hidden_states) == len(out.attentions) == 4
    # step 0 is the prompt's prefill, later steps one token each; every layer plus the embeddings
    for step, (hidden, attentions) in enumerate(zip(out.hidden_states, out.attentions, strict=True)):
        length = PROMPT if step == 0 else 1
        assert len(hidden) == layers + 1 and len(attentions) == layers
        assert all(h.shape == (2, length, model.config.hidden_size) for h in hidden)
        assert all(a.shape == (2, model.config.num_attention_heads, length, PROMPT + step) for a in attentions)
        start = 0 if step == 0 else PROMPT + step - 1
        for layer, h in enumerate(hidden):
            reference = full.hidden_states[layer][:, start : start + length]
            torch.testing.assert_close(h, reference, atol=1e-5, rtol=1e-5, msg=f"step {step} layer {layer}")
        last_rows = full.attentions[-1][:, :, start : start + length, : PROMPT + step]
        torch.testing.assert_close(attentions[-1], last_rows, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("generation", GENERATIONS)
def test_beam_search_scores_are_the_sequences_log_probabilities(tiny_model_factory, generation):
    model = tiny_model_factory(generation, seed=42)
    ids = _ids(42, batch=1)
    with torch.no_grad():
        one_beam = model.generate(ids, max_new_tokens=NEW, num_beams=1, do_sample=False, pad_token_id=0)
        out = model.generate(
            ids,
            max_new_tokens=NEW,
            num_beams=4,
            num_return_sequences=4,
            do_sample=False,
            length_penalty=1.0,
            early_stopping=True,
            pad_token_id=0,
            eos_token_id=None,
            return_dict_in_generate=True,
            output_scores=True,
        )
    assert torch.equal(one_beam, _greedy_by_full_forwards(model, ids, NEW)[0])
    assert out.sequences.shape == (4, PROMPT + NEW) and torch.equal(out.sequences[:, :PROMPT], ids.expand(4, -1))
    assert len({tuple(s.tolist()) for s in out.sequences}) == 4  # four distinct beams
    scores = out.sequences_scores.tolist()
    assert scores == sorted(scores, reverse=True)
    for sequence, score in zip(out.sequences, scores, strict=True):
        # length_penalty 1.0: the score is the summed log-probability over the generated length
        assert _sequence_logprob(model, sequence, PROMPT) / NEW == pytest.approx(score, abs=1e-4)
    # beam search keeps candidates greedy drops: its best beam is at least as likely as the greedy sequence
    assert scores[0] >= _sequence_logprob(model, one_beam[0], PROMPT) / NEW - 1e-5


@pytest.mark.parametrize("generation", GENERATIONS)
def test_beam_sample_and_multiple_samples(tiny_model_factory, generation):
    model = tiny_model_factory(generation, seed=43)
    ids = _ids(43)
    kwargs = dict(max_new_tokens=NEW, do_sample=True, pad_token_id=0)
    with torch.no_grad():
        torch.manual_seed(1)
        a = model.generate(ids, num_beams=3, num_return_sequences=2, **kwargs)
        torch.manual_seed(1)
        b = model.generate(ids, num_beams=3, num_return_sequences=2, **kwargs)
        samples = model.generate(ids, num_return_sequences=3, top_k=50, **kwargs)
        greedy_rows = model.generate(ids, num_return_sequences=3, top_k=1, **kwargs)
    greedy = _greedy_by_full_forwards(model, ids, NEW)[0]
    assert a.shape == (4, PROMPT + NEW) and torch.equal(a, b)
    # rows come out grouped by prompt: prompt 0's samples first
    assert samples.shape == (6, PROMPT + NEW)
    assert torch.equal(samples[:, :PROMPT], ids.repeat_interleave(3, dim=0))
    assert len({tuple(s.tolist()) for s in samples[:3]}) > 1  # sampling draws different continuations
    assert torch.equal(greedy_rows, greedy.repeat_interleave(3, dim=0))


@pytest.mark.parametrize("generation", GENERATIONS)
def test_assisted_decoding_gives_the_target_models_greedy_tokens(tiny_model_factory, generation):
    model = tiny_model_factory(generation, seed=44)
    # a different model drafts, so some drafts are rejected and the cache is cropped back
    assistant = tiny_model_factory(generation, seed=45)
    ids = _ids(44, batch=1)
    greedy = _greedy_by_full_forwards(model, ids, NEW)[0]
    with torch.no_grad():
        assisted = model.generate(ids, assistant_model=assistant, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
        self_assisted = model.generate(
            ids, assistant_model=copy.deepcopy(model), max_new_tokens=NEW, do_sample=False, pad_token_id=0
        )
    assert torch.equal(assisted, greedy) and torch.equal(self_assisted, greedy)


@pytest.mark.parametrize("generation", GENERATIONS)
def test_prompt_lookup_decoding_gives_greedy_tokens(tiny_model_factory, generation):
    model = tiny_model_factory(generation, seed=46)
    # a repetitive prompt, so n-gram lookup proposes candidates
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    greedy = _greedy_by_full_forwards(model, ids, NEW)[0]
    with torch.no_grad():
        lookup = model.generate(ids, prompt_lookup_num_tokens=3, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    assert torch.equal(lookup, greedy)


@pytest.mark.parametrize("generation", GENERATIONS)
def test_generation_continues_from_a_returned_cache(tiny_model_factory, generation):
    model = tiny_model_factory(generation, seed=47)
    ids = _ids(47)
    kwargs = dict(do_sample=False, pad_token_id=0)
    with torch.no_grad():
        whole = model.generate(ids, max_new_tokens=NEW, **kwargs)
        first = model.generate(ids, max_new_tokens=NEW // 2, return_dict_in_generate=True, **kwargs)
        # the cache holds every token but the last one generated; generate feeds the rest
        second = model.generate(first.sequences, cache=first.cache, max_new_tokens=NEW - NEW // 2, **kwargs)
    assert torch.equal(second, whole)


@pytest.mark.parametrize("generation", GENERATIONS)
def test_generation_stops_at_eos_and_pads_finished_rows(tiny_model_factory, generation):
    model = tiny_model_factory(generation, seed=48)
    ids = _ids(48)
    greedy = _greedy_by_full_forwards(model, ids, NEW)[0]
    eos = greedy[0, PROMPT + 2].item()  # row 0's third new token
    assert eos not in greedy[0, PROMPT : PROMPT + 2].tolist()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW, do_sample=False, eos_token_id=eos, pad_token_id=0)
        held = model.generate(
            ids[:1], max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, eos_token_id=eos, pad_token_id=0
        )
    assert torch.equal(out[0, : PROMPT + 3], greedy[0, : PROMPT + 3])
    row1 = greedy[1, PROMPT:].tolist()
    if eos in row1:  # row 1 stops at its own first eos
        stop = PROMPT + row1.index(eos) + 1
        assert torch.equal(out[1, :stop], greedy[1, :stop])
    else:
        assert torch.equal(out[1], greedy[1])
    # finished row 0 is padded while row 1 runs on (or both end at the longest row)
    assert (out[0, PROMPT + 3 :] == 0).all()
    # min_new_tokens masks eos until it is reached: the row runs its full length and never emits eos early
    assert held.shape == (1, PROMPT + NEW) and eos not in held[0, PROMPT:-1].tolist()


def test_2025_generates_from_inputs_embeds_like_from_ids(tiny_model_factory):
    model = tiny_model_factory("2025", seed=49)
    ids = _ids(49)
    with torch.no_grad():
        from_ids = model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
        from_embeds = model.generate(
            inputs_embeds=model.model.embed_tokens(ids), max_new_tokens=NEW, do_sample=False, pad_token_id=0
        )
    assert torch.equal(from_embeds, from_ids[:, PROMPT:])  # only the new tokens come back


def test_2026_generate_from_inputs_embeds_alone_is_refused(tiny_model_factory):
    model = tiny_model_factory("2026", seed=50)
    ids = _ids(50)
    with torch.no_grad(), pytest.raises(ValueError, match="value embeddings or smear.*pass `input_ids`"):
        model.generate(inputs_embeds=model.model.embed_tokens(ids), max_new_tokens=2, pad_token_id=0)
