"""Pairwise LLM judge: a causal model asked which answer is better, in both orders.

LLM judges favour a position (Zheng et al. 2023, "Judging LLM-as-a-judge", section 3.3).
Each pair is asked twice, with the answers swapped; only a verdict that survives the swap
counts, and one that changes with the order is recorded as a tie. The model's answer
must match a strict pattern; anything else is a recorded `NoVerdict`, never a guess.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

from judges.base import JudgeSpecError, NoVerdict, PairToJudge, Verdict, checkpoint_fingerprint

DEFAULT_TEMPLATE = """You are judging two answers to the same request.

Request:
{prompt}

Answer A:
{completion_a}

Answer B:
{completion_b}

Which answer is better? Reply with exactly one of: A, B, tie, both bad.
Verdict: """

# The whole reply must be one verdict (an optional full stop and whitespace allowed).
DEFAULT_PATTERN = r"\s*(?P<verdict>A|B|tie|both bad)\.?\s*"
PLACEHOLDERS = ("{prompt}", "{completion_a}", "{completion_b}")

# A verdict as read in the asked order -> the winner among the pair's (a, b), for the
# order as stored (a shown first) and swapped (b shown first).
_AS_ASKED = {"A": "a", "B": "b", "tie": "tie", "both bad": "both_bad"}
_SWAPPED = {"A": "b", "B": "a", "tie": "tie", "both bad": "both_bad"}

# Engines are slow to start, so judges on the same model and engine settings share one.
_ENGINES: dict[tuple, Any] = {}


def fill_template(template: str, prompt: str, first: str, second: str) -> str:
    # str.replace, not str.format: a user's template may hold braces of its own (JSON).
    return (template.replace("{prompt}", prompt)
            .replace("{completion_a}", first).replace("{completion_b}", second))


def combine_orders(as_stored: str | None, swapped: str | None, raw: tuple[str, str]) -> Verdict | NoVerdict:
    """One verdict from the two orders; `as_stored`/`swapped` are winners among (a, b),
    None where the reply did not parse."""
    replies = f"a first: {raw[0]!r}; b first: {raw[1]!r}"
    if as_stored is None or swapped is None:
        return NoVerdict("reply did not match the verdict pattern", replies)
    if as_stored == swapped:
        return Verdict(as_stored, confidence=1.0, rationale=replies)
    return Verdict("tie", confidence=0.5, rationale=f"verdict changed with the order ({replies})")


def render_question(tokenizer: Any, text: str, use_chat_template: bool | None) -> dict[str, Any]:
    """The judge's question as a vLLM prompt: through the chat template (by default when the
    tokenizer has one) as token ids, since templated text tokenized again by vLLM would
    hold a second BOS; else as text, which vLLM tokenizes with its special tokens."""
    if use_chat_template is None:  # auto: instruction-tuned models carry a chat template
        use_chat_template = getattr(tokenizer, "chat_template", None) is not None
    if not use_chat_template:
        return {"prompt": text}
    return {"prompt_token_ids": list(tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=True, add_generation_prompt=True, return_dict=False))}


class PairwiseLLMJudge:
    """Asks a causal model (through vLLM, greedy) which of two answers is better."""

    def __init__(
        self,
        model: str | Path,
        *,
        template: str | None = None,
        template_file: str | Path | None = None,
        verdict_pattern: str = DEFAULT_PATTERN,
        name: str | None = None,
        version: str | None = None,
        max_tokens: int = 8,
        use_chat_template: bool | None = None,
        dtype: str = "auto",
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.3,
        enforce_eager: bool = False,
        seed: int = 0,
    ) -> None:
        path = Path(model).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise JudgeSpecError(f"LLM judge model {path} has no config.json (is it a save_pretrained directory?)")
        if template is not None and template_file is not None:
            raise JudgeSpecError("give the LLM judge a template or a template_file, not both")
        if template_file is not None:
            try:
                template = Path(template_file).expanduser().read_text()
            except OSError as error:
                raise JudgeSpecError(f"cannot read template_file {template_file}: {error.strerror}") from error
        self.template = DEFAULT_TEMPLATE if template is None else template
        missing = [p for p in PLACEHOLDERS if p not in self.template]
        if missing:
            raise JudgeSpecError(f"LLM judge template lacks {', '.join(missing)}")
        try:
            self.pattern = re.compile(verdict_pattern)
        except re.error as error:
            raise JudgeSpecError(f"verdict_pattern does not compile: {error}") from error
        if "verdict" not in self.pattern.groupindex:
            raise JudgeSpecError("verdict_pattern needs a named group (?P<verdict>...)")
        if max_tokens < 1:
            raise JudgeSpecError(f"max_tokens must be >= 1, got {max_tokens}")
        self.path = path
        self.name = name or f"llm:{path.name}"
        self.version = version or checkpoint_fingerprint(path, self.template, verdict_pattern, str(max_tokens))
        self.max_tokens = max_tokens
        self.use_chat_template = use_chat_template
        self.engine_settings = dict(
            dtype=dtype, max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager, seed=seed,
        )

    @property
    def _engine_key(self) -> tuple:
        return (str(self.path), tuple(sorted(self.engine_settings.items())))

    def _engine(self):
        if self._engine_key not in _ENGINES:
            from vllm import LLM

            _ENGINES[self._engine_key] = LLM(model=str(self.path), **self.engine_settings)
        return _ENGINES[self._engine_key]

    def _render(self, engine, text: str) -> dict[str, Any]:
        return render_question(engine.get_tokenizer(), text, self.use_chat_template)

    def parse(self, reply: str) -> str | None:
        """The verdict word of a reply ('A', 'B', 'tie', 'both bad'), or None."""
        match = self.pattern.fullmatch(reply)
        if match is None or match["verdict"] not in _AS_ASKED:
            return None
        return match["verdict"]

    def judge(self, pairs: Sequence[PairToJudge]) -> list[Verdict | NoVerdict]:
        from vllm import SamplingParams

        if not pairs:
            return []
        engine = self._engine()
        prompts = []
        for pair in pairs:
            prompts.append(self._render(engine, fill_template(self.template, pair.prompt, pair.completion_a, pair.completion_b)))
            prompts.append(self._render(engine, fill_template(self.template, pair.prompt, pair.completion_b, pair.completion_a)))
        outputs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=self.max_tokens), use_tqdm=False)
        replies = [output.outputs[0].text for output in outputs]
        verdicts = []
        for stored_reply, swapped_reply in zip(replies[0::2], replies[1::2]):
            stored, swapped = self.parse(stored_reply), self.parse(swapped_reply)
            verdicts.append(combine_orders(
                None if stored is None else _AS_ASKED[stored],
                None if swapped is None else _SWAPPED[swapped],
                (stored_reply, swapped_reply),
            ))
        return verdicts

    def close(self) -> None:
        """Shut down this judge's engine (and so that of judges sharing it)."""
        engine = _ENGINES.pop(self._engine_key, None)
        if engine is not None:
            engine.llm_engine.engine_core.shutdown()
