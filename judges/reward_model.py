"""Reward-model judge: a transformers sequence-classification model with one output."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Sequence

from judges.base import JudgeSpecError, Messages, PairToJudge, Verdict, checkpoint_fingerprint, verdicts_from_scores


class RewardModelJudge:
    """Scores a prompt and completion with a reward model and prefers the higher reward.

    Conversations are rendered with the reward model's own chat template (its tokenizer
    may differ from the policy's); see `token_ids`. Texts are scored in batches sorted by
    length (less padding), right-padded. Runs on CUDA when there is a GPU, else the CPU.
    """

    def __init__(
        self,
        model: str | Path,
        *,
        name: str | None = None,
        version: str | None = None,
        batch_size: int = 16,
        device: str | None = None,
        dtype: str = "auto",
        max_length: int | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(model).expanduser().resolve()
        config = _read_config(path)
        architectures = config.get("architectures") or []
        if not any(a.endswith("ForSequenceClassification") for a in architectures):
            # Loading a causal LM this way would bolt on a random score head, silently.
            raise JudgeSpecError(
                f"reward model {path} is a {', '.join(architectures) or 'model of unknown type'}, "
                "not a sequence-classification model"
            )
        num_labels = len(config.get("id2label") or {}) or config.get("num_labels", 2)
        if num_labels != 1:
            raise JudgeSpecError(f"reward model {path} has {num_labels} outputs; a reward model needs exactly 1")
        if batch_size < 1:
            raise JudgeSpecError(f"reward model batch_size must be >= 1, got {batch_size}")
        self.name = name or f"reward-model:{path.name}"
        self.version = version or checkpoint_fingerprint(path)
        self.batch_size = batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "right"
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch_dtype)
        self.model.to(self.device).eval()
        if self.tokenizer.pad_token is None:
            # Many causal checkpoints ship no pad token; EOS is the usual stand-in.
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # The model finds each row's last real token through this id.
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self._accepted_inputs = set(inspect.signature(self.model.forward).parameters)
        self.max_length = max_length or getattr(self.model.config, "max_position_embeddings", None)

    def score(self, items: Sequence[tuple[str, str]], messages: Sequence[Messages | None] | None = None
              ) -> list[float]:
        import torch

        conversations = messages if messages is not None else [None] * len(items)
        encoded = [self.token_ids(prompt, completion, conversation)
                   for (prompt, completion), conversation in zip(items, conversations)]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        scores = [0.0] * len(encoded)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                indices = order[start : start + self.batch_size]
                batch = self.tokenizer.pad({"input_ids": [encoded[i] for i in indices]}, return_tensors="pt")
                inputs = {k: v.to(self.device) for k, v in batch.items() if k in self._accepted_inputs}
                rewards = self.model(**inputs).logits[:, 0].float().cpu().tolist()
                for i, reward in zip(indices, rewards):
                    scores[i] = reward
        return scores

    def token_ids(self, prompt: str, completion: str, conversation: Messages | None) -> list[int]:
        """What the reward model reads: a conversation and the completion as the assistant's
        turn, rendered by this model's own chat template and tokenized without adding
        special tokens again (as TRL does); plain `prompt + completion` text where the
        prompt is text or the model has no template. Cut from the left to `max_length`,
        so the last tokens, where the reward is read, survive."""
        if conversation is not None and getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                [*conversation, {"role": "assistant", "content": completion}], tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(prompt + completion)["input_ids"]
        return ids[-self.max_length:] if self.max_length else ids

    def judge(self, pairs: Sequence[PairToJudge]) -> list[Verdict]:
        return verdicts_from_scores(self, pairs, bradley_terry=True)


def _read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise JudgeSpecError(f"model directory {path} has no config.json (is it a save_pretrained directory?)")
    try:
        return json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise JudgeSpecError(f"cannot read {config_file}: {error}") from error
