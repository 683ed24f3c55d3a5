"""Pair formation: completions of the same prompt become candidate preference pairs."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Mapping, Sequence

from storage.records import Completion, Pair

STRATEGIES = ("random", "all", "best_vs_worst")
# Strategies that rank completions by a scalar judge's scores before pairing.
NEEDS_SCORES = ("best_vs_worst",)


def form_pairs(
    completions: Sequence[Completion],
    round_id: int,
    strategy: str,
    seed: int,
    scores: Mapping[int, float] | None = None,
) -> list[Pair]:
    """Pairs of distinct-text completions of the same prompt.

    `random`: shuffle each prompt's completions and pair them off (each used at most once).
    `all`: every two completions with different text.
    `best_vs_worst`: per prompt, the highest- against the lowest-scored completion
    (`scores` by completion id), as in Xu et al. 2023 (Some things are more CRINGE than
    others) and Yuan et al. 2024 (Self-Rewarding LMs); prompts whose completions all
    score the same give no pair. Which one is `a` is random, so position says nothing.
    Identical texts carry no preference signal, so they are never paired.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"pair strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy in NEEDS_SCORES and scores is None:
        raise ValueError(f"pair strategy {strategy!r} needs scores")
    by_prompt: dict[int, list[Completion]] = defaultdict(list)
    for completion in completions:
        by_prompt[completion.prompt_id].append(completion)
    rng = random.Random(seed)
    pairs = []
    for prompt_id in sorted(by_prompt):
        group = sorted(by_prompt[prompt_id], key=lambda c: c.sample_index)
        if strategy == "all":
            candidates = [(a, b) for i, a in enumerate(group) for b in group[i + 1 :]]
        elif strategy == "best_vs_worst":
            best = max(group, key=lambda c: scores[c.completion_id])
            worst = min(group, key=lambda c: scores[c.completion_id])
            candidates = []
            if scores[best.completion_id] > scores[worst.completion_id]:
                candidates = [(best, worst) if rng.random() < 0.5 else (worst, best)]
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


def within_budget(pairs: list[Pair], max_pairs: int | None, seed: int) -> list[Pair]:
    """At most `max_pairs` of `pairs`: a seeded random subset, in their original order, so
    a round's labels stay within budget without favouring the first prompts."""
    if max_pairs is None or len(pairs) <= max_pairs:
        return pairs
    # Its own stream: form_pairs drew from Random(seed) already.
    kept = sorted(random.Random(f"pair budget {seed}").sample(range(len(pairs)), max_pairs))
    return [pairs[i] for i in kept]
