"""Reward-model judge: a transformers sequence-classification model with one output."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Sequence

from judges.base import JudgeSpecError, PairToJudge, Verdict, checkpoint_fingerprint, verdicts_from_scores


class RewardModelJudge:
    """Scores `prompt + completion` with a reward model and prefers the higher reward.

    Texts are scored in batches sorted by length (less padding), right-padded, and cut
    from the left when too long, so the last tokens, where the reward is read, survive.
    Runs on CUDA when there is a GPU, otherwise on the CPU.
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
        self.tokenizer.truncation_side = "left"
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

    def score(self, items: Sequence[tuple[str, str]]) -> list[float]:
        import torch

        texts = [prompt + completion for prompt, completion in items]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        scores = [0.0] * len(texts)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                indices = order[start : start + self.batch_size]
                batch = self.tokenizer(
                    [texts[i] for i in indices], padding=True, truncation=self.max_length is not None,
                    max_length=self.max_length, return_tensors="pt",
                )
                # Tokenizers may return inputs the model does not take (token_type_ids).
                inputs = {k: v.to(self.device) for k, v in batch.items() if k in self._accepted_inputs}
                rewards = self.model(**inputs).logits[:, 0].float().cpu().tolist()
                for i, reward in zip(indices, rewards):
                    scores[i] = reward
        return scores

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
