"""Tiny chat models for tests, built from nothing in seconds on a CPU.

`build_chat_policy`: a two-layer Llama that answers two-number addition through a chat
template. Its end-of-turn token `<|end|>` is not the tokenizer's EOS `</s>` (as in many
real chat models), and its tokenizer adds `<s>` on a plain encode while the template
starts with `<s>` too, so tokenizing templated text with the default
`add_special_tokens=True` gives two BOS: code that gets this wrong is caught.

`build_chat_reward_model`: a sequence-classification Llama (random, untrained) whose
tokenizer and chat template differ from the policy's in every special token and id, so
that code which tokenizes with the wrong one is caught.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile
from pathlib import Path

from flywheel.examples.addition import ALPHABET, addition_prompt, noisy_answer

# Lower-case letters and punctuation, for the system prompts.
CHAT_ALPHABET = ALPHABET + "abcdefghijklmnopqrstuvwxyz.,"

POLICY_BOS, POLICY_EOS, POLICY_PAD = "<s>", "</s>", "<pad>"
SYSTEM, USER, ASSISTANT, END_OF_TURN = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
POLICY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Some training conversations open with one of these, so the policy answers with or without.
SYSTEM_PROMPTS = ("you add numbers.", "answer with the sum.")

# Llama-2 style: the system prompt inside the first user turn, each assistant turn closed by EOS.
REWARD_BOS, REWARD_EOS, REWARD_PAD, REWARD_UNK = "<bos>", "<eos>", "[PAD]", "<unk>"
INST, END_INST, SYS, END_SYS = "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"
REWARD_CHAT_TEMPLATE = (
    "{% if messages[0].role == 'system' %}{% set system = messages[0].content %}"
    "{% set turns = messages[1:] %}{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}"
    "{% if m.role == 'user' %}{{ bos_token }}[INST]"
    "{% if loop.first and system %}<<SYS>>{{ system }}<</SYS>>{% endif %}{{ m.content }}[/INST]"
    "{% else %}{{ m.content }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)

# The policy's build: small enough to train in well under a minute on two cores.
HIDDEN_SIZE, NUM_LAYERS, NUM_HEADS, MAX_POSITIONS = 64, 2, 1, 128
SFT_STEPS, SFT_BATCH_SIZE, SFT_LR, ANSWER_NOISE, MAX_OPERAND, SEED = 400, 64, 3e-3, 0.3, 99, 0


def chat_policy_cache_key() -> str:
    """Names the cached policy: every setting and the recipe are this file, so any edit
    to it builds a new one rather than reusing a stale build."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def _char_tokenizer(tokens: list[str], specials: list[str], bos: str, eos: str, pad: str, unk: str,
                    chat_template: str):
    """A character-level fast tokenizer whose ids are the positions in `tokens` (special
    tokens and single characters). Each of `specials` is one token wherever it appears
    in text; a plain encode starts with `bos`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(tokens)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    core.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    extra = [token for token in specials if token not in (bos, eos, pad, unk)]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos, pad_token=pad,
                                        unk_token=unk, additional_special_tokens=extra)
    tokenizer.chat_template = chat_template
    return tokenizer


def chat_policy_tokenizer():
    # <pad> doubles as the unknown token, as in the demo policy's tokenizer.
    specials = [POLICY_PAD, POLICY_BOS, POLICY_EOS, SYSTEM, USER, ASSISTANT, END_OF_TURN]
    return _char_tokenizer([*specials, *CHAT_ALPHABET], specials, POLICY_BOS, POLICY_EOS, POLICY_PAD, POLICY_PAD,
                           POLICY_CHAT_TEMPLATE)


def chat_reward_tokenizer():
    # Characters in reverse order and the specials after them: no id means to the reward
    # model what it means to the policy.
    specials = [REWARD_UNK, INST, END_INST, SYS, END_SYS, REWARD_BOS, REWARD_EOS, REWARD_PAD]
    return _char_tokenizer([*CHAT_ALPHABET[::-1], *specials], specials, REWARD_BOS, REWARD_EOS, REWARD_PAD,
                           REWARD_UNK, REWARD_CHAT_TEMPLATE)


def addition_conversation(a: int, b: int, rng: random.Random) -> list[dict[str, str]]:
    """The user asks `a+b=`; half the time a system prompt comes first."""
    system = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.5 else []
    return [*system, {"role": "user", "content": addition_prompt(a, b)}]


def _sft_examples(tokenizer, rng: random.Random, count: int) -> list[tuple[list[int], list[int]]]:
    """(templated prompt ids, answer ids + <|end|>) of `count` random addition chats,
    tokenized once through the chat template, as vLLM will see them."""
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    examples = []
    for _ in range(count):
        a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
        prompt_ids = tokenizer.apply_chat_template(addition_conversation(a, b, rng), tokenize=True,
                                                   add_generation_prompt=True, return_dict=False)
        answer = noisy_answer(a, b, ANSWER_NOISE, rng)
        examples.append((list(prompt_ids), tokenizer.convert_tokens_to_ids(list(answer)) + [end]))
    return examples


def _sft_batch(examples: list[tuple[list[int], list[int]]], pad: int):
    """Right-padded input ids and labels: loss only on the answer and its <|end|>."""
    import torch

    width = max(len(prompt) + len(answer) for prompt, answer in examples)
    rows, labels = [], []
    for prompt, answer in examples:
        padding = width - len(prompt) - len(answer)
        rows.append(prompt + answer + [pad] * padding)
        labels.append([-100] * len(prompt) + answer + [-100] * padding)
    return torch.tensor(rows), torch.tensor(labels)


def _tiny_llama_config(tokenizer, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN_SIZE, intermediate_size=4 * HIDDEN_SIZE,
        num_hidden_layers=NUM_LAYERS, num_attention_heads=NUM_HEADS, num_key_value_heads=NUM_HEADS,
        max_position_embeddings=MAX_POSITIONS, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
        **extra,
    )


def build_chat_policy(directory: Path) -> Path:
    """Train the chat policy (seeded, float32, CPU) and save it with its tokenizer and a
    generation config that stops on <|end|> or </s>; returns `directory`."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    tokenizer = chat_policy_tokenizer()
    model = LlamaForCausalLM(_tiny_llama_config(tokenizer))
    examples = _sft_examples(tokenizer, rng, 4096)
    optimizer = torch.optim.AdamW(model.parameters(), lr=SFT_LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=SFT_LR, total_steps=SFT_STEPS, pct_start=0.05)
    model.train()
    for _ in range(SFT_STEPS):
        input_ids, labels = _sft_batch(rng.sample(examples, SFT_BATCH_SIZE), tokenizer.pad_token_id)
        loss = model(input_ids=input_ids, attention_mask=(input_ids != tokenizer.pad_token_id).long(),
                     labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids(END_OF_TURN), tokenizer.eos_token_id],
    )
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def cached_chat_policy(cache: Path) -> Path:
    """The chat policy under `cache`, built on first use. It is built in a scratch
    directory and renamed into place, so a killed build never leaves a half policy."""
    target = Path(cache) / f"chat-policy-{chat_policy_cache_key()}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build_chat_policy(scratch)
        scratch.chmod(0o755)  # mkdtemp's 0700 would hide the cache from other users of it
        os.rename(scratch, target)
    except OSError:
        if not target.is_dir():  # not another process that finished the same build first
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def build_chat_reward_model(directory: Path) -> Path:
    """A seeded random `LlamaForSequenceClassification` with one output and its own
    tokenizer and chat template; returns `directory`."""
    import torch
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(SEED)
    tokenizer = chat_reward_tokenizer()
    model = LlamaForSequenceClassification(_tiny_llama_config(tokenizer, num_labels=1))
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
