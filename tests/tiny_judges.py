"""Tiny judge models trained by the tests themselves (nothing can be downloaded here).

- A reward model: a 2-layer Llama sequence classifier trained with the Bradley-Terry loss
  to prefer the right sum of the demo task (operands 0-9) over near misses.
- A causal "LLM judge" that learned three prompt templates: one where it judges answers
  ("good" beats "bad", two of a kind tie or are both bad), one where it always answers
  "A" (a judge with pure position bias), and one where it rambles (unparseable).
"""

from __future__ import annotations

import random
import string
from pathlib import Path

import torch
import torch.nn.functional as F

from flywheel.checkpoints import save_checkpoint
from flywheel.demo_task import ALPHABET, sft_batch, addition_prompt, build_char_tokenizer


def tiny_llama_config(tokenizer, max_position_embeddings: int, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **extra,
    )


def optimizer_step(loss, optimizer) -> None:
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

# -- reward model ------------------------------------------------------------------------

RM_MAX_OPERAND = 9
NEAR_MISSES = (-10, -2, -1, 1, 2, 10)


def near_miss(a: int, b: int, rng: random.Random) -> str:
    return str(max(0, a + b + rng.choice(NEAR_MISSES)) if a + b >= 10 else a + b + rng.choice((1, 2, 10)))


def build_reward_model(directory: Path, steps: int = 800, seed: int = 0) -> Path:
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = build_char_tokenizer()
    model = LlamaForSequenceClassification(tiny_llama_config(tokenizer, 64, num_labels=1))
    facts = [(a, b) for a in range(RM_MAX_OPERAND + 1) for b in range(RM_MAX_OPERAND + 1)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        texts = []
        for a, b in rng.sample(facts, 64):
            texts += [addition_prompt(a, b) + str(a + b), addition_prompt(a, b) + near_miss(a, b, rng)]
        batch = tokenizer(texts, padding=True, return_tensors="pt", return_token_type_ids=False)
        rewards = model(**batch).logits[:, 0]
        # Bradley-Terry: -log sigmoid(r(right) - r(wrong)).
        optimizer_step(-F.logsigmoid(rewards[0::2] - rewards[1::2]).mean(), optimizer)
    target = Path(directory) / "reward-model"
    save_checkpoint(model, tokenizer, target)
    return target


# -- pairwise LLM judge ------------------------------------------------------------------

JUDGE_ALPHABET = ALPHABET + string.ascii_letters + ":?!|"
TEMPLATES = {
    "judging": "{prompt}|A:{completion_a}|B:{completion_b}|Better?",
    "always_a": "{prompt}|A:{completion_a}|B:{completion_b}|Pick!",
    "rambling": "{prompt}|A:{completion_a}|B:{completion_b}|Think:",
}
VERDICT_TEXT = {("good", "bad"): "A", ("bad", "good"): "B", ("good", "good"): "tie", ("bad", "bad"): "both bad"}


def judge_reply(template: str, first: str, second: str) -> str:
    if template == "judging":
        return VERDICT_TEXT[(first, second)]
    return "A" if template == "always_a" else "hmm"


def build_llm_judge(directory: Path, steps: int = 400, seed: int = 0) -> Path:
    from transformers import LlamaForCausalLM

    from judges.llm import fill_template

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = build_char_tokenizer(JUDGE_ALPHABET)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer, 128, tie_word_embeddings=True))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        contexts, replies = [], []
        for _ in range(64):
            name = rng.choice(list(TEMPLATES))
            first, second = rng.choice(list(VERDICT_TEXT))
            prompt = addition_prompt(rng.randint(0, 99), rng.randint(0, 99))
            contexts.append(fill_template(TEMPLATES[name], prompt, first, second))
            replies.append(judge_reply(name, first, second))
        # Loss on the reply and its <eos> only, as in the demo policy's SFT.
        input_ids, labels = sft_batch(tokenizer.get_vocab(), contexts, replies, tokenizer.bos_token_id,
                                       tokenizer.eos_token_id, tokenizer.pad_token_id)
        loss = model(input_ids=input_ids, attention_mask=(input_ids != tokenizer.pad_token_id).long(),
                     labels=labels).loss
        optimizer_step(loss, optimizer)
    target = Path(directory) / "llm-judge"
    save_checkpoint(model, tokenizer, target)
    return target
