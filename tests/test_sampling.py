"""The vLLM sampler on what users feed it: batches of hundreds of prompts of mixed
lengths, up to the longest that leaves room for `max_tokens` in the context."""

import random

import pytest

from conftest import E2E_SAMPLE
from storage.records import Prompt

pytestmark = pytest.mark.slow


def operand_prompt(rng: random.Random, tokens: int) -> str:
    """A `1+2+...=` prompt that the demo's character tokenizer makes `tokens` ids of (BOS included)."""
    text = ""
    while len(text) < tokens - 2:
        text += str(rng.randint(0, 9)) + "+"
    return text[: tokens - 2].rstrip("+").ljust(tokens - 2, "1") + "="


def test_a_batch_of_256_prompts_up_to_the_context_limit_samples_each_as_if_alone(tiny_policy, policy_sampler):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)
    longest = E2E_SAMPLE.max_model_len - E2E_SAMPLE.max_tokens
    rng = random.Random(0)
    # Short, middling (the 31 tokens of the reported crash) and longest prompts, mixed.
    lengths = [rng.choice([4, 7, 16, 17, 31, longest - 1, longest]) for _ in range(256)]
    prompts = [Prompt(i, operand_prompt(rng, length), "train") for i, length in enumerate(lengths)]
    completions = policy_sampler.sample(tiny_policy, 1, prompts, n=4, temperature=1.0, seed=7,
                                        purpose="train", round_id=None, progress=False)
    assert len(completions) == 256 * 4
    for completion in completions:
        prompt = prompts[completion.prompt_id]
        assert list(completion.prompt_token_ids) == tokenizer(prompt.text)["input_ids"]
        assert len(completion.prompt_token_ids) == lengths[completion.prompt_id]
        assert 1 <= len(completion.token_ids) <= E2E_SAMPLE.max_tokens
    # One seed per prompt: a prompt's samples do not depend on its batch neighbours, long or short.
    alone = [prompts[i] for i in (0, lengths.index(longest), lengths.index(31))]
    again = policy_sampler.sample(tiny_policy, 1, alone, n=4, temperature=1.0, seed=7,
                                  purpose="train", round_id=None, progress=False)
    in_batch = {(c.prompt_id, c.sample_index): list(c.token_ids) for c in completions}
    assert {(c.prompt_id, c.sample_index): list(c.token_ids) for c in again} == {
        key: ids for key, ids in in_batch.items() if key[0] in {p.prompt_id for p in alone}}


def untied_copies(tiny_policy, directory):
    """Two checkpoints of the tiny policy's shape with an output head of their own (not
    tied to the embeddings): the second a perturbed copy of the first."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32, tie_word_embeddings=False)
    noise = torch.Generator().manual_seed(1)
    paths = []
    for name in ("untied-1", "untied-2"):
        with torch.no_grad():
            model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
            model.lm_head.weight.add_(0.05 * torch.randn(model.lm_head.weight.shape, generator=noise))
        assert not model.config.tie_word_embeddings and model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
        model.save_pretrained(directory / name)
        AutoTokenizer.from_pretrained(tiny_policy).save_pretrained(directory / name)
        paths.append(directory / name)
    return paths


def samples_and_top_logprobs(sampler, checkpoint, prompts) -> tuple[list, list]:
    """256 prompts x 4 seeded samples (as a round draws them), and the top-5 log-probs of
    each greedy step of 32 prompts, both from the checkpoint `sampler` serves."""
    from vllm import SamplingParams

    texts = [(c.prompt_id, c.sample_index, c.text) for c in sampler.sample(
        checkpoint, 1, prompts, n=4, temperature=1.0, seed=3, purpose="train", round_id=None, progress=False)]
    greedy = sampler._llm.generate([p.text for p in prompts[:32]], SamplingParams(temperature=0, max_tokens=4, logprobs=5),
                                   use_tqdm=False)
    top = [[{token: entry.logprob for token, entry in step.items()} for step in output.outputs[0].logprobs]
           for output in greedy]
    return texts, top


def test_a_checkpoint_reloaded_in_place_samples_exactly_as_a_fresh_engine_tied_or_untied(
        tiny_policy, perturbed_policy, policy_sampler, demo_prompts, tmp_path):
    import dataclasses

    from flywheel.prompts import load_prompts
    from flywheel.sampling import VLLMSampler

    prompts = [Prompt(i, text, "train") for i, text in enumerate(load_prompts(demo_prompts[0])[:256])]
    engine_settings = dataclasses.replace(E2E_SAMPLE, gpu_memory_utilization=0.1)
    first_untied, second_untied = untied_copies(tiny_policy, tmp_path)
    # Tied (the demo policy, whose head is its embedding matrix): the session's engine has
    # served the tiny policy; it reloads the perturbed one. Untied: an engine of its own.
    policy_sampler.sample(tiny_policy, 1, prompts[:4], n=2, temperature=1.0, seed=0, purpose="train",
                          round_id=None, progress=False)
    untied_sampler = VLLMSampler(engine_settings, seed=0)
    untied_sampler.sample(first_untied, 1, prompts[:4], n=2, temperature=1.0, seed=0, purpose="train",
                          round_id=None, progress=False)
    for reloaded, checkpoint in ((policy_sampler, perturbed_policy), (untied_sampler, second_untied)):
        after_reload = samples_and_top_logprobs(reloaded, checkpoint, prompts)
        fresh = VLLMSampler(engine_settings, seed=0)
        try:
            from_fresh = samples_and_top_logprobs(fresh, checkpoint, prompts)
        finally:
            fresh.close()
        assert after_reload[0] == from_fresh[0], f"{checkpoint.name}: samples differ after a reload"
        assert after_reload[1] == from_fresh[1], f"{checkpoint.name}: top-5 log-probs differ after a reload"
    untied_sampler.close()


@pytest.mark.timeout(300)  # vLLM alone would wait for the dead engine for ever
def test_an_engine_killed_in_the_middle_of_a_call_ends_it_with_the_cause_and_the_next_call_starts_anew(
        tiny_policy, demo_prompts):
    import dataclasses
    import os
    import signal
    import threading

    from flywheel.errors import EngineDiedError
    from flywheel.lease import started_processes, stop_processes
    from flywheel.prompts import load_prompts
    from flywheel.sampling import VLLMSampler

    prompts = [Prompt(i, text, "train") for i, text in enumerate(load_prompts(demo_prompts[0])[:32])]
    sampler = VLLMSampler(dataclasses.replace(E2E_SAMPLE, gpu_memory_utilization=0.1), seed=0)
    draw = dict(n=2, temperature=1.0, seed=0, purpose="train", round_id=None, progress=False)
    first = sampler.sample(tiny_policy, 1, prompts, **draw)
    (engine,) = [process.pid for process in sampler._engine_processes()]
    workers = started_processes(engine)
    # Stopped first, so the next call is surely waiting for it when it is killed.
    os.kill(engine, signal.SIGSTOP)
    threading.Timer(2.0, os.kill, (engine, signal.SIGKILL)).start()
    try:
        with pytest.raises(EngineDiedError, match="its process was killed by SIGKILL"):
            sampler.sample(tiny_policy, 1, prompts, **draw)
    finally:
        stop_processes(workers)
    # A new engine, and the same seeded samples as before.
    again = sampler.sample(tiny_policy, 1, prompts, **draw)
    sampler.close()
    assert [c.text for c in again] == [c.text for c in first]
