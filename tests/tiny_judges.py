"""Tiny judge models trained by the tests themselves (nothing can be downloaded here).

- A reward model: a 2-layer Llama sequence classifier trained with the Bradley-Terry loss
  to prefer the right sum of the demo task (operands 0-9) over near misses.
- A causal "LLM judge" that learned three prompt templates: one where it judges answers
  ("good" beats "bad", two of a kind tie or are both bad), one where it always answers
  "A" (a judge with pure position bias), and one where it rambles (unparseable).
"""

from __future__ import annotations

import itertools
import random
import string
from pathlib import Path

import torch
import torch.nn.functional as F

from flywheel.checkpoints import save_checkpoint
from flywheel.examples.addition import ALPHABET, sft_batch, addition_prompt, build_char_tokenizer


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


def near_miss_offsets(a: int, b: int) -> tuple[int, ...]:
    """What a near miss of a + b may add to it (never below zero)."""
    return NEAR_MISSES if a + b >= 10 else (1, 2, 10)


def near_miss(a: int, b: int, rng: random.Random) -> str:
    return str(max(0, a + b + rng.choice(near_miss_offsets(a, b))))


def every_training_pair() -> list[tuple[str, str]]:
    """(prompt + right sum, prompt + near miss) for every fact and every near miss that
    `near_miss` can give."""
    pairs = []
    for a in range(RM_MAX_OPERAND + 1):
        for b in range(RM_MAX_OPERAND + 1):
            for wrong in sorted({str(max(0, a + b + offset)) for offset in near_miss_offsets(a, b)} - {str(a + b)}):
                pairs.append((addition_prompt(a, b) + str(a + b), addition_prompt(a, b) + wrong))
    return pairs


# The reward model trains until the right sum beats the near miss by RM_MARGIN (in reward
# units, far above the 1e-6 by which the judge's padding and batching move a score) in at
# least RM_ACCURACY of all (fact, near miss) pairs. Seeds 0-7, default threads and
# OMP_NUM_THREADS=1, reached it in 200-500 steps at 0.98-1.0.
RM_MARGIN = 0.05
RM_ACCURACY = 0.97


def build_reward_model(directory: Path, max_steps: int = 5000, seed: int = 0, check_every: int = 100) -> Path:
    """Train until the criterion above holds on the whole training set, not for a fixed
    number of steps: how many that takes depends on the seed and the machine's floats.
    Raises if it never does."""
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = build_char_tokenizer()
    model = LlamaForSequenceClassification(tiny_llama_config(tokenizer, 64, num_labels=1))
    facts = [(a, b) for a in range(RM_MAX_OPERAND + 1) for b in range(RM_MAX_OPERAND + 1)]
    every_pair = every_training_pair()

    def rewards(texts: list[str]) -> torch.Tensor:
        batch = tokenizer(texts, padding=True, return_tensors="pt", return_token_type_ids=False)
        return model(**batch).logits[:, 0]

    def accuracy() -> float:
        with torch.no_grad():
            scores = rewards([text for pair in every_pair for text in pair])
        return ((scores[0::2] - scores[1::2]) >= RM_MARGIN).float().mean().item()

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(1, max_steps + 1):
        texts = []
        for a, b in rng.sample(facts, 64):
            texts += [addition_prompt(a, b) + str(a + b), addition_prompt(a, b) + near_miss(a, b, rng)]
        scores = rewards(texts)
        # Bradley-Terry: -log sigmoid(r(right) - r(wrong)).
        optimizer_step(-F.logsigmoid(scores[0::2] - scores[1::2]).mean(), optimizer)
        if step % check_every == 0 and accuracy() >= RM_ACCURACY:
            break
    else:
        raise RuntimeError(f"the tiny reward model ranked only {accuracy():.3f} of its training pairs "
                           f"right by {RM_MARGIN} after {max_steps} steps (needs {RM_ACCURACY})")
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


# The LLM judge trains until, on every template and verdict for these prompts (the
# tests' own among them), each reply token is the model's top choice by this many logits:
# greedy decoding, in vLLM or in transformers, then writes exactly the trained reply.
JUDGE_CHECK_PROMPTS = ["3+4=", "56+7=", "1+1=", "9+90=", "12+34=", "8+8=", "0+0=", "99+99=", "45+54=", "7+70="]
JUDGE_LOGIT_MARGIN = 1.0


def judge_batch(tokenizer, contexts: list[str], replies: list[str]):
    """Right-padded ids and labels (loss on the reply and its <eos> only, as in the demo
    policy's SFT), with the attention mask."""
    input_ids, labels = sft_batch(tokenizer.get_vocab(), contexts, replies, tokenizer.bos_token_id,
                                   tokenizer.eos_token_id, tokenizer.pad_token_id)
    return input_ids, labels, (input_ids != tokenizer.pad_token_id).long()


def replies_are_greedy_with_margin(model, tokenizer) -> bool:
    from judges.llm import fill_template

    contexts, replies = [], []
    for template, (first, second), prompt in itertools.product(TEMPLATES, VERDICT_TEXT, JUDGE_CHECK_PROMPTS):
        contexts.append(fill_template(TEMPLATES[template], prompt, first, second))
        replies.append(judge_reply(template, first, second))
    input_ids, labels, attention_mask = judge_batch(tokenizer, contexts, replies)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    targets = labels[:, 1:]
    scored = targets != -100
    target_logits = logits.gather(2, targets.clamp(min=0).unsqueeze(2)).squeeze(2)
    others = logits.scatter(2, targets.clamp(min=0).unsqueeze(2), float("-inf")).amax(2)
    return bool(((target_logits - others)[scored] >= JUDGE_LOGIT_MARGIN).all())


def build_llm_judge(directory: Path, max_steps: int = 4000, seed: int = 0, check_every: int = 100) -> Path:
    """Train until `replies_are_greedy_with_margin`, not for a fixed number of steps (how
    many that takes depends on the seed and the machine's floats). Raises if it never does."""
    from transformers import LlamaForCausalLM

    from judges.llm import fill_template

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = build_char_tokenizer(JUDGE_ALPHABET)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer, 128, tie_word_embeddings=True))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(1, max_steps + 1):
        contexts, replies = [], []
        for _ in range(64):
            name = rng.choice(list(TEMPLATES))
            first, second = rng.choice(list(VERDICT_TEXT))
            prompt = addition_prompt(rng.randint(0, 99), rng.randint(0, 99))
            contexts.append(fill_template(TEMPLATES[name], prompt, first, second))
            replies.append(judge_reply(name, first, second))
        input_ids, labels, attention_mask = judge_batch(tokenizer, contexts, replies)
        optimizer_step(model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss, optimizer)
        if step % check_every == 0 and replies_are_greedy_with_margin(model, tokenizer):
            break
    else:
        raise RuntimeError(f"the tiny LLM judge did not learn its replies (by a logit margin of "
                           f"{JUDGE_LOGIT_MARGIN}) in {max_steps} steps")
    target = Path(directory) / "llm-judge"
    save_checkpoint(model, tokenizer, target)
    return target
