"""Chat models end to end: conversations from parquet through `datasets`, sampled as
token ids, judged by a reward model with its own template, and the stale-weights check."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from chat_models import SYSTEM_PROMPTS, addition_conversation
from conftest import run_flow
from flywheel.config import FlywheelConfig, JudgeConfig, PairConfig, PromptSource, SampleConfig, TrainConfig
from flywheel.rounds import STALE_WEIGHTS_GAP, Flywheel
from flywheel.training import sampler_logprob_gap
from storage import tables
from storage.records import Prompt
from test_export import check_the_step, one_dpo_step

pytestmark = pytest.mark.slow

CHAT_SAMPLE = SampleConfig(prompts_per_round=48, n=4, max_tokens=6, dtype="float32", enforce_eager=True)


@pytest.fixture(scope="module")
def chat_prompts(tmp_path_factory) -> Path:
    """A directory `datasets` reads as splits `train` and `test`: conversations, some with
    a system prompt, in TRL's conversational format."""
    import datasets

    directory = tmp_path_factory.mktemp("chat-prompts")
    rng = random.Random(5)
    for split, count in (("train", 96), ("test", 16)):
        conversations = [addition_conversation(rng.randrange(50), rng.randrange(50), rng) for _ in range(count)]
        datasets.Dataset.from_dict({"prompt": conversations}).to_parquet(str(directory / f"{split}.parquet"))
    return directory


@pytest.fixture(scope="module")
def chat_sampler():
    from flywheel.sampling import VLLMSampler

    sampler = VLLMSampler(CHAT_SAMPLE, seed=0)
    yield sampler
    sampler.close()


@pytest.fixture(scope="module")
def chat_flywheel(chat_policy, chat_reward_model, chat_prompts, chat_sampler, tmp_path_factory):
    config = FlywheelConfig(
        workdir=tmp_path_factory.mktemp("chat-flywheel"), reference_model=chat_policy,
        prompts=PromptSource(dataset=str(chat_prompts), split="train"),
        heldout_prompts=PromptSource(dataset=str(chat_prompts), split="test"),
        judge=JudgeConfig(f"reward-model:{chat_reward_model}"), seed=1,
        sample=CHAT_SAMPLE, pair=PairConfig(strategy="best_vs_worst"),
        train=TrainConfig(learning_rate=1e-4, batch_size=16),
    )
    wheel = Flywheel(config, sampler=chat_sampler)
    wheel.initialise()
    yield wheel
    wheel.close()


def test_two_chat_rounds_sample_what_the_template_renders(chat_flywheel, prefect_harness):
    from transformers import AutoTokenizer

    store = chat_flywheel.store
    assert run_flow(chat_flywheel, rounds=2) == [1, 2]
    tokenizer = AutoTokenizer.from_pretrained(chat_flywheel.config.reference_model)
    prompts = {p.prompt_id: p for split in ("train", "heldout") for p in store.read(tables.prompts, split)}
    assert all(p.messages is not None for p in prompts.values())
    assert any(p.messages[0]["content"] in SYSTEM_PROMPTS for p in prompts.values())
    completions = store.read(tables.completions)
    assert completions
    end_of_turn = tokenizer.convert_tokens_to_ids("<|end|>")
    for c in completions:
        expected = tokenizer.apply_chat_template(prompts[c.prompt_id].messages, tokenize=True,
                                                 add_generation_prompt=True, return_dict=False)
        assert c.prompt_token_ids == expected
        assert c.prompt_token_ids.count(tokenizer.bos_token_id) == 1
    finished = [c for c in completions if c.finish_reason == "stop"]
    # The template's end-of-turn token (from generation_config, not the tokenizer's EOS)
    # ends a completion, and is kept for training.
    assert len(finished) > len(completions) / 2
    assert all(c.token_ids[-1] == end_of_turn for c in finished)
    _, rows = store.query("SELECT state, pairs, labels, sampler_logprob_gap FROM round_summary ORDER BY round_id")
    print("round_summary (state, pairs, labels, sampler_logprob_gap):", rows)
    for state, pairs, labels, gap in rows:
        assert state == "done" and pairs > 0 and labels == pairs
        assert 0 <= gap < STALE_WEIGHTS_GAP
    # Each pair was judged by the reward model reading its own template.
    _, judges = store.query("SELECT DISTINCT judge_name FROM labels")
    assert judges == [(chat_flywheel.judge.name,)]


def test_the_rounds_preferences_export_to_what_trl_trains_on(chat_flywheel, tmp_path):
    from flywheel.export import write_preferences

    exported = write_preferences(chat_flywheel.config.database, tmp_path / "preferences.parquet")
    assert exported.conversational and exported.rows == sum(
        chat_flywheel.store.read(tables.count_preferences, round_id) for round_id in (1, 2))
    trainer, before = one_dpo_step(chat_flywheel.config.reference_model, exported.path, tmp_path / "trl")
    check_the_step(trainer, before)
    row = trainer.train_dataset[0]
    assert row["prompt_ids"].count(1) == 1  # TRL rendered the same template: one <s>


def test_the_reward_model_reads_the_conversation_with_its_own_template(chat_flywheel):
    from transformers import AutoTokenizer

    judge = chat_flywheel.judge
    conversation = [{"role": "system", "content": "you add numbers."}, {"role": "user", "content": "2+3="}]
    ids = judge.token_ids("ignored", "5", conversation)
    own = AutoTokenizer.from_pretrained(judge.model.name_or_path)
    text = own.apply_chat_template([*conversation, {"role": "assistant", "content": "5"}], tokenize=False)
    assert text == "<bos>[INST]<<SYS>>you add numbers.<</SYS>>2+3=[/INST]5<eos>"
    assert ids == own(text, add_special_tokens=False)["input_ids"]
    assert ids.count(own.bos_token_id) == 1
    # Plain-text prompts are scored as text, as before.
    assert judge.token_ids("2+3=", "5", None) == own("2+3=5")["input_ids"]
    scores = judge.score([("", "5"), ("", "6")], [conversation, conversation])
    assert scores[0] != scores[1]


def test_a_skipped_reload_shows_in_the_logprob_gap(chat_flywheel, chat_policy, tmp_path):
    """Sampling the checkpoint it holds, the sampler agrees with the trainer; told it holds
    another checkpoint while it still has the old weights (a missed reload), it does not."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    changed = tmp_path / "changed"
    model = AutoModelForCausalLM.from_pretrained(chat_policy, dtype=torch.float32)
    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=noise))
    model.save_pretrained(changed)
    AutoTokenizer.from_pretrained(chat_policy).save_pretrained(changed)

    sampler = chat_flywheel.sampler
    prompts = [Prompt(i, "", "heldout", addition_conversation(i, 2 * i, random.Random(i))) for i in range(16)]
    kwargs = dict(n=2, temperature=1.0, seed=0, purpose="eval", round_id=None, progress=False)
    reloaded = sampler.sample(changed, 99, prompts, **kwargs)
    gap = sampler_logprob_gap(changed, reloaded, batch_size=16)
    assert gap < STALE_WEIGHTS_GAP
    sampler._loaded = Path(chat_policy).resolve()  # skip the reload: it still holds `changed`
    stale = sampler.sample(chat_policy, 1, prompts, **kwargs)
    stale_gap = sampler_logprob_gap(chat_policy, stale, batch_size=16)
    print(f"log-prob gap: reloaded {gap:.2e}, reload skipped {stale_gap:.3f} nats per token")
    assert stale_gap > 10 * max(gap, 1e-3) and stale_gap > STALE_WEIGHTS_GAP
    sampler._loaded = None  # the next call loads its checkpoint again


def test_an_llm_judge_question_goes_to_vllm_as_token_ids_with_one_bos(chat_flywheel, chat_policy):
    """The LLM judge's chat-templated question, rendered with vLLM's own tokenizer of a
    model whose template writes the BOS, reaches the engine with exactly one BOS."""
    from vllm import SamplingParams

    from judges.llm import render_question

    sampler = chat_flywheel.sampler
    sampler.sample(chat_policy, 1, [Prompt(1, "1+1=", "train")], n=2, temperature=1.0, seed=0, purpose="eval",
                   round_id=None, progress=False)  # the chat policy's engine, as the judge would have it
    engine = sampler._llm
    tokenizer = engine.get_tokenizer()
    question = render_question(tokenizer, "which is better.", use_chat_template=None)
    assert tokenizer.decode(question["prompt_token_ids"]) == "<s><|user|>which is better.<|end|><|assistant|>"
    output = engine.generate([question], SamplingParams(max_tokens=1), use_tqdm=False)[0]
    assert output.prompt_token_ids.count(tokenizer.bos_token_id) == 1
    assert render_question(tokenizer, "2+3=", use_chat_template=False) == {"prompt": "2+3="}
