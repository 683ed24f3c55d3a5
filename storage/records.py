"""Plain records that cross the store boundary. No behaviour, no imports of ours."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Sequence

# The steps of a round in the order they finish. `rounds.state` holds the last finished
# step, so a round that was killed resumes from the step after it. `labelling`: the
# round's pairs are queued for people, and it waits there until their quota or deadline.
ROUND_STATES = ("started", "sampled", "paired", "labelling", "labelled", "trained", "evaluated", "done")

WINNERS = ("a", "b", "tie", "both_bad")


@dataclass(frozen=True)
class Prompt:
    """A prompt; `messages` is the conversation ([{"role", "content"}, ...]) of a prompt
    given as one, whose `text` is then its turns as plain text (what text judges see)."""

    prompt_id: int
    text: str
    split: str
    messages: list[dict[str, str]] | None = None


@dataclass(frozen=True)
class PairForJudge:
    """A pair as its judge reads it; `truncated_*`: that completion was cut at max_tokens."""

    pair_id: int
    prompt: str
    completion_a: str
    completion_b: str
    prompt_messages: list[dict[str, str]] | None
    truncated_a: bool
    truncated_b: bool


@dataclass(frozen=True)
class LabelWithTexts:
    """A label with the texts of its pair, as exports write it."""

    pair_id: int
    round_id: int
    prompt: str
    messages: list[dict[str, str]] | None  # the prompt's conversation; None for plain text
    completion_a: str
    completion_b: str
    winner: str
    judge: str  # name@version
    annotator: str | None
    confidence: float | None
    annotator_gold_accuracy: float | None = None  # the person's, over all gold pairs (annotator_gold)


@dataclass(frozen=True)
class Checkpoint:
    checkpoint_id: int
    path: str
    role: str
    status: str
    parent_checkpoint_id: int | None
    round_id: int | None


@dataclass(frozen=True)
class Round:
    round_id: int
    state: str
    policy_checkpoint_id: int
    reference_checkpoint_id: int
    candidate_checkpoint_id: int | None
    seed: int
    config: dict[str, Any]
    judge_name: str | None = None
    judge_version: str | None = None

    def has_finished(self, state: str) -> bool:
        return ROUND_STATES.index(self.state) >= ROUND_STATES.index(state)


@dataclass(frozen=True)
class Completion:
    """One sampled completion. Token ids: the sampler gives `array('i')` (4 bytes an id
    instead of about 36 in a list of Python ints, and the store copies them whole); the
    store reads them back as lists; any sequence of ints is accepted."""

    prompt_id: int
    checkpoint_id: int
    purpose: str
    sample_index: int
    text: str
    prompt_token_ids: Sequence[int]
    token_ids: Sequence[int]
    cumulative_logprob: float | None
    finish_reason: str | None
    sampling_params: dict[str, Any]
    round_id: int | None = None
    completion_id: int | None = None


@dataclass(frozen=True)
class Pair:
    round_id: int
    prompt_id: int
    completion_a_id: int
    completion_b_id: int
    strategy: str
    pair_id: int | None = None


@dataclass(frozen=True)
class Label:
    pair_id: int
    winner: str
    judge_name: str
    judge_version: str
    annotator: str | None = None
    confidence: float | None = None
    rationale: str | None = None


@dataclass(frozen=True)
class JudgeFailure:
    """A pair a judge could not decide, with its raw output."""

    pair_id: int
    judge_name: str
    judge_version: str
    reason: str
    raw_output: str | None = None


@dataclass(frozen=True)
class CompletionScore:
    completion_id: int
    judge_name: str
    judge_version: str
    score: float


@dataclass(frozen=True)
class PreferenceTriple:
    """A labelled pair resolved to token ids, ready for the DPO collator."""

    pair_id: int
    prompt_token_ids: list[int]
    chosen_token_ids: list[int]
    rejected_token_ids: list[int]
    chosen_completion_id: int | None = None
    rejected_completion_id: int | None = None


@dataclass(frozen=True)
class StepMetrics:
    """What one DPO optimiser step measured."""

    step: int
    loss: float
    chosen_reward: float
    rejected_reward: float
    reward_margin: float
    accuracy: float
    grad_norm: float
    learning_rate: float
    num_pairs: int
    tokens_per_second: float  # prompt and completion tokens of chosen and rejected, through forward and backward
    seconds: float = 0.0  # the step's wall time: its forward and backward passes and the optimiser step
    pair_ids: tuple[int, ...] = ()  # the pairs the step trained on (stored in train_pairs)


@dataclass(frozen=True)
class TrainStep:
    round_id: int
    checkpoint_id: int
    metrics: StepMetrics


@dataclass(frozen=True)
class Evaluation:
    round_id: int
    checkpoint_id: int
    incumbent_checkpoint_id: int
    num_prompts: int
    num_samples: int
    accuracy: float | None
    incumbent_accuracy: float | None
    win_rate: float
    mean_length: float
    # Mean of log pi(y|x) - log ref(y|x) over the candidate's held-out samples.
    kl_to_reference: float | None = None


@dataclass(frozen=True)
class RoundPhase:
    """A row of `round_phases`: a phase of a round (kind 'phase': sample, logprob_check,
    reference_logps, train, evaluate) or what the sampler's engine did (kind 'sampler':
    start, reload, sleep, wake), with when it started and how long it took."""

    round_id: int
    kind: str
    name: str
    detail: str | None
    started_at: datetime
    seconds: float
    peak_gpu_bytes: int | None
