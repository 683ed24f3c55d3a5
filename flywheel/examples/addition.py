"""The demo task and demo policy: two-number addition, needing nothing from the internet.

The task is verifiable (`addition_score` checks the sum), so a rule judge labels pairs
exactly and held-out accuracy measures the policy. The policy is a few-layer Llama with a
character-level tokenizer, trained by supervised fine-tuning on deliberately noisy
answers: with probability `noise` the target is a near miss (off by 1, 2 or 10). Sampling it at
temperature 1 is then right only about `1 - noise` of the time, which leaves the
flywheel room to improve it.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from flywheel.checkpoints import save_checkpoint
from flywheel.errors import UserError

if TYPE_CHECKING:
    from flywheel.config import FlywheelConfig, RunFile

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
ALPHABET = "0123456789+= "
# Bump when the build recipe changes (noise model, tokenizer, training loop), so a policy
# cached by an older recipe is not reused.
RECIPE_VERSION = 1
_PROMPT = re.compile(r"^\s*(\d+)\s*\+\s*(\d+)\s*=\s*$")


def addition_prompt(a: int, b: int) -> str:
    return f"{a}+{b}="


def addition_operands(prompt: str) -> tuple[int, int]:
    """(a, b) of an `a+b=` prompt; ValueError for any other prompt."""
    match = _PROMPT.match(prompt)
    if match is None:
        raise ValueError(f"not an addition prompt: {prompt!r}")
    return int(match[1]), int(match[2])


def addition_score(prompt: str, completion: str) -> float:
    """1.0 when the completion is exactly the sum asked for by the prompt, else 0.0."""
    a, b = addition_operands(prompt)
    return 1.0 if completion.strip() == str(a + b) else 0.0


def build_char_tokenizer(alphabet: str = ALPHABET):
    """A character-level fast tokenizer that adds <bos> and decodes without spaces."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, BOS: 1, EOS: 2}
    for char in alphabet:
        vocab.setdefault(char, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=PAD
    )


@dataclass(frozen=True)
class DemoPolicyConfig:
    """How the demo policy is built. Its hash names the cache entry."""

    max_operand: int = 99
    noise: float = 0.5
    num_layers: int = 2
    hidden_size: int = 128
    num_heads: int = 2
    sft_steps: int = 1500
    sft_batch_size: int = 128
    sft_lr: float = 3e-3
    heldout_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.noise < 1.0:
            raise UserError(f"noise must be in [0, 1), got {self.noise}")
        if self.max_operand < 2:
            raise UserError(f"max_operand must be at least 2, got {self.max_operand}")

    def cache_key(self) -> str:
        keyed = {**asdict(self), "recipe_version": RECIPE_VERSION}
        return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:12]

    def sft_answer(self, a: int, b: int, rng: random.Random) -> str:
        """One SFT target for `a+b=`: the errors this policy is built to make."""
        return noisy_answer(a, b, self.noise, rng)


@dataclass(frozen=True)
class SloppyCarryPolicyConfig(DemoPolicyConfig):
    """The initial policy of the task where online DPO must beat offline (issue 23;
    docs/online_vs_offline_carry.md says why): two errors, to be unlearned in sequence.

    - `sloppiness`: on every prompt, the share of SFT answers that write the last digit
      twice (`577` for 57). One habit, the same on every prompt.
    - `carry_slip`: on prompts whose units digits carry (`27+15=`), the share of SFT
      answers that drop the carry (32 for 42), whether or not they are also doubled.

    `noise` (the demo's near misses) is 0 here.
    """

    noise: float = 0.0
    sloppiness: float = 0.7
    carry_slip: float = 0.85

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.noise != 0.0:
            raise UserError("the sloppy-carry policy makes no near misses: leave noise at 0")
        for name in ("sloppiness", "carry_slip"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    def sft_answer(self, a: int, b: int, rng: random.Random) -> str:
        return sloppy_carry_answer(a, b, self.sloppiness, self.carry_slip, rng)


def split_operands(config: DemoPolicyConfig) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """All (a, b) operand pairs, split into train and held-out; held-out is never trained on."""
    everything = [(a, b) for a in range(config.max_operand + 1) for b in range(config.max_operand + 1)]
    random.Random(config.seed).shuffle(everything)
    return everything[config.heldout_size :], everything[: config.heldout_size]


def noisy_answer(a: int, b: int, noise: float, rng: random.Random) -> str:
    """The right sum, or with probability `noise` a near miss (off by 1, 2 or 10)."""
    total = a + b
    if rng.random() >= noise:
        return str(total)
    wrong = total + rng.choice([-10, -2, -1, 1, 2, 10])
    return str(wrong if wrong >= 0 else total + 1)


def carries(a: int, b: int) -> bool:
    """Whether the units digits of a + b carry into the tens."""
    return a % 10 + b % 10 >= 10


def sloppy_carry_answer(a: int, b: int, sloppiness: float, carry_slip: float, rng: random.Random) -> str:
    """The right sum; on a carrying prompt, with probability `carry_slip`, the sum without
    the carry (a + b - 10); then, with probability `sloppiness`, its last digit written twice."""
    total = a + b - (10 if carries(a, b) and rng.random() < carry_slip else 0)
    answer = str(total)
    return answer + answer[-1] if rng.random() < sloppiness else answer


def answer_kind(prompt: str, completion: str) -> str:
    """What a completion of an addition prompt is, in the sloppy-carry task's terms:
    `right`, `doubled` (the right sum with its last digit twice), `dropped carry` (a + b - 10
    on a carrying prompt, doubled or not) or `other`. `ERROR_KINDS_SQL` is the same in SQL."""
    a, b = addition_operands(prompt)
    answer, total, dropped = completion.strip(), str(a + b), str(a + b - 10)
    if answer == total:
        return "right"
    if answer == total + total[-1]:
        return "doubled"
    if carries(a, b) and answer in (dropped, dropped + dropped[-1]):
        return "dropped carry"
    return "other"


# `answer_kind` over every stored completion: one row per completion with its round,
# checkpoint, purpose, whether its prompt carries, and its kind (`other` for a prompt that
# is not an addition). Whitespace is stripped as Python's str.strip() does.
ERROR_KINDS_SQL = f"""
WITH operands AS (
    SELECT c.completion_id, c.round_id, c.checkpoint_id, c.purpose,
           regexp_replace(c.text, '^\\s+|\\s+$', '', 'g') AS answer,
           regexp_extract(p.text, '{_PROMPT.pattern}', ['a', 'b']) AS operand
    FROM completions c JOIN prompts p USING (prompt_id)),
sums AS (
    SELECT * EXCLUDE (operand, a, b), CAST(a + b AS VARCHAR) AS total, CAST(a + b - 10 AS VARCHAR) AS dropped,
           a % 10 + b % 10 >= 10 AS carries
    FROM (SELECT *, TRY_CAST(operand.a AS INTEGER) AS a, TRY_CAST(operand.b AS INTEGER) AS b FROM operands))
SELECT completion_id, round_id, checkpoint_id, purpose, coalesce(carries, false) AS carries,
       CASE WHEN answer = total THEN 'right'
            WHEN answer = total || right(total, 1) THEN 'doubled'
            WHEN carries AND answer IN (dropped, dropped || right(dropped, 1)) THEN 'dropped carry'
            ELSE 'other' END AS kind
FROM sums
"""


def build_demo_policy(
    directory: Path, config: DemoPolicyConfig, log: Callable[[str], None] = print
) -> Path:
    """Train (or reuse from the cache) the noisy SFT policy; return its checkpoint directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    target = Path(directory) / f"sft-{config.cache_key()}"
    if (target / "flywheel_demo.json").is_file():
        return target
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    tokenizer = build_char_tokenizer()
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.hidden_size,
            intermediate_size=4 * config.hidden_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_heads,
            max_position_embeddings=64,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
        )
    )
    vocab = tokenizer.get_vocab()
    train_operands, _ = split_operands(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.sft_lr, weight_decay=0.0)
    warmup = max(1, config.sft_steps // 20)
    started = time.monotonic()
    model.train()
    for step in range(config.sft_steps):
        # Linear warm-up then cosine decay: a fixed recipe that converges in ~1.5k steps here.
        progress = max(0.0, (step - warmup) / max(1, config.sft_steps - warmup))
        lr = config.sft_lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = rng.sample(train_operands, config.sft_batch_size)
        prompts = [addition_prompt(a, b) for a, b in batch]
        answers = [config.sft_answer(a, b, rng) for a, b in batch]
        input_ids, labels = sft_batch(
            vocab, prompts, answers, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        )
        loss = model(input_ids=input_ids, attention_mask=(input_ids != tokenizer.pad_token_id).long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 250 == 0 or step == config.sft_steps - 1:
            log(f"  demo policy SFT step {step + 1}/{config.sft_steps}  loss {loss.item():.3f}  "
                f"({time.monotonic() - started:.0f} s)")
    save_checkpoint(model, tokenizer, target)
    # The marker goes last: a directory without it is an interrupted build and is redone.
    (target / "flywheel_demo.json").write_text(json.dumps(asdict(config), indent=2))
    return target


def sft_batch(vocab: dict[str, int], prompts: list[str], answers: list[str], bos: int, eos: int, pad: int):
    """Right-padded ids with loss only on answer tokens and the closing <eos>.

    Char-level, so ids come straight from the vocabulary: calling the tokenizer per
    example made SFT several times slower on this CPU.
    """
    import torch

    rows, label_rows = [], []
    for prompt, answer in zip(prompts, answers):
        prompt_ids = [bos] + [vocab[c] for c in prompt]
        answer_ids = [vocab[c] for c in answer] + [eos]
        rows.append(prompt_ids + answer_ids)
        label_rows.append([-100] * len(prompt_ids) + answer_ids)
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in label_rows])
    return input_ids, labels


def write_demo_prompts(directory: Path, config: DemoPolicyConfig, num_train_prompts: int) -> tuple[Path, Path]:
    """Write train and held-out prompt files, `train.jsonl` and `heldout.jsonl` (JSONL, one
    {"prompt": ...} per line)."""
    train_operands, heldout_operands = split_operands(config)
    rng = random.Random(config.seed + 1)
    chosen = rng.sample(train_operands, min(num_train_prompts, len(train_operands)))
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, operands in (("train.jsonl", chosen), ("heldout.jsonl", heldout_operands)):
        path = directory / name
        path.write_text("".join(json.dumps({"prompt": addition_prompt(a, b)}) + "\n" for a, b in operands))
        paths.append(path)
    return paths[0], paths[1]


# What `flywheel demo` leaves in its directory, for a config of your own to use (the
# README's example does): the demo policy, its prompts, and the config the demo ran.
DEMO_POLICY = "policy"  # a link to the cached demo policy, a save_pretrained directory
DEMO_PROMPTS = "prompts"  # train.jsonl and heldout.jsonl
DEMO_CONFIG = "flywheel.yaml"  # as `flywheel run --config` reads it
DEMO_ROUNDS = 8
DEMO_TRAIN_PROMPTS = 4096


@dataclass(frozen=True)
class DemoFiles:
    policy: Path
    prompts: Path
    heldout: Path


def lay_out_demo(directory: Path, policy: Path, policy_config: DemoPolicyConfig,
                 num_train_prompts: int = DEMO_TRAIN_PROMPTS) -> DemoFiles:
    """Put the demo's inputs in `directory`: `policy`, a link to the policy checkpoint,
    and `prompts/train.jsonl` and `prompts/heldout.jsonl`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    link, target = directory / DEMO_POLICY, Path(policy).resolve()
    if link.exists() and not link.is_symlink():
        if link.resolve() != target:
            raise UserError(f"{link} is in the way of the demo policy's link: move it away")
    elif not (link.is_symlink() and link.resolve() == target):
        scratch = directory / f".{DEMO_POLICY}.link"
        scratch.unlink(missing_ok=True)
        scratch.symlink_to(target, target_is_directory=True)
        scratch.replace(link)
    prompts, heldout = write_demo_prompts(directory / DEMO_PROMPTS, policy_config, num_train_prompts)
    return DemoFiles(link, prompts, heldout)


def demo_flywheel_config(
    workdir: Path,
    policy_config: DemoPolicyConfig,
    cache: Path,
    log: Callable[[str], None],
    nll_weight: float = 1.0,
    seed: int | None = None,
    **sample_options,
) -> FlywheelConfig:
    """The demo flywheel's config: the (cached) noisy policy and its prompts, laid out in
    `workdir` (`lay_out_demo`), the rule judge that checks the sum, and the demo's
    sampling, training and evaluation. The flywheel's seed is the policy's unless given."""
    from flywheel.config import EvalConfig, FlywheelConfig, JudgeConfig, SampleConfig, TrainConfig

    files = lay_out_demo(workdir, build_demo_policy(cache, policy_config, log=log), policy_config)
    return FlywheelConfig(
        workdir=workdir,
        reference_model=files.policy,
        prompts=files.prompts,
        heldout_prompts=files.heldout,
        judge=JudgeConfig("rule:flywheel.examples.addition:addition_score", {"name": "addition-verifier"}),
        seed=policy_config.seed if seed is None else seed,
        # A model this small gains nothing from torch.compile, which costs ~30 s per start.
        sample=SampleConfig(**{"prompts_per_round": 512, "n": 4, "max_tokens": 8, "dtype": "float32",
                               "enforce_eager": True, **sample_options}),
        # The reference is a few MB: keeping it loaded saves two loads a round.
        train=TrainConfig(learning_rate=3e-4, batch_size=32, epochs=2, nll_weight=nll_weight,
                          keep_reference_loaded=True),
        eval=EvalConfig(samples_per_prompt=4, accuracy_score="flywheel.examples.addition:addition_score"),
    )


def prepare_demo(directory: Path, policy_config: DemoPolicyConfig, cache: Path, log: Callable[[str], None],
                 settings: Sequence[tuple[str, Any]] = (), overrides: Sequence[str] = ()) -> RunFile:
    """Build (or reuse) the demo policy, lay out the demo in `directory`, and return what
    `flywheel demo` runs: the demo's config with `settings` and `overrides` set (as
    `flywheel.config.load_run_config` sets them) and DEMO_ROUNDS rounds unless they say.
    The result is written to `directory/flywheel.yaml` first, so that
    `flywheel run --config` on it continues the same flywheel."""
    from flywheel.config import RunFile, override_run_file, write_config_file

    directory = Path(directory)
    config = demo_flywheel_config(directory, policy_config, cache, log)
    run_file = override_run_file(RunFile(config, DEMO_ROUNDS), settings, overrides)
    path = directory / DEMO_CONFIG
    policy_link = directory / DEMO_POLICY
    # The link, not the cache it points to, unless the policy was overridden.
    keep = {"reference_model": DEMO_POLICY} if run_file.config.reference_model == policy_link.resolve() else {}
    write_config_file(path, run_file, replace=keep, header=(
        "# The config `flywheel demo` ran last, every key written out; paths are relative to this file.\n"
        f"# More rounds of the same flywheel: flywheel run --config {path}\n"))
    return run_file
