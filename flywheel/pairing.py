"""Pair formation: completions of the same prompt become candidate preference pairs."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Sequence

from storage.records import Completion, Pair

STRATEGIES = ("random", "all")


def form_pairs(completions: Sequence[Completion], round_id: int, strategy: str, seed: int) -> list[Pair]:
    """Pairs of distinct-text completions of the same prompt.

    `random`: shuffle each prompt's completions and pair them off (each used at most once).
    `all`: every two completions with different text. Identical texts carry no preference
    signal, so they are never paired.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"pair strategy must be one of {STRATEGIES}, got {strategy!r}")
    by_prompt: dict[int, list[Completion]] = defaultdict(list)
    for completion in completions:
        by_prompt[completion.prompt_id].append(completion)
    rng = random.Random(seed)
    pairs = []
    for prompt_id in sorted(by_prompt):
        group = sorted(by_prompt[prompt_id], key=lambda c: c.sample_index)
        if strategy == "all":
            candidates = [(a, b) for i, a in enumerate(group) for b in group[i + 1 :]]
        else:
            # Distinct texts first, so two copies of one answer do not waste a slot.
            unique = list({c.text: c for c in group}.values())
            rng.shuffle(unique)
            candidates = list(zip(unique[0::2], unique[1::2]))
        pairs.extend(
            Pair(round_id, prompt_id, a.completion_id, b.completion_id, strategy)
            for a, b in candidates
            if a.text != b.text
        )
    return pairs
