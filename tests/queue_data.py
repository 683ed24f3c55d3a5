"""Rounds with pairs written straight into a real store, for queue tests that need no model.

The completions are made-up sums (`right` or off by one); nothing here is a fake of our
own code: the rows go through the store's ordinary writers.
"""

from __future__ import annotations

from pathlib import Path

from storage.records import Completion, Pair
from storage.store import Store


def round_with_pairs(store: Store, num_pairs: int) -> int:
    """A new round with `num_pairs` pairs, each a right and a wrong answer to its own sum;
    returns the round id. Completion a is always the right answer."""
    with store.transaction() as tx:
        if tx.reference_checkpoint() is None:
            tx.add_checkpoint("/models/reference", role="reference", status="promoted")
        reference = tx.reference_checkpoint().checkpoint_id
        round_id = tx.start_round(reference, reference, seed=tx.count("rounds") + 1, config={})
        first = tx.count("prompts")
        texts = [f"{first + i}+{i % 7}=" for i in range(num_pairs)]
        prompt_ids = tx.add_prompts(texts, "train")
        completions = []
        for prompt_id, text in zip(prompt_ids, texts):
            a, b = (int(x) for x in text[:-1].split("+"))
            for index, answer in enumerate((a + b, a + b + 1)):
                completions.append(Completion(prompt_id, reference, "train", index, str(answer), [1, 5],
                                              [7, 2], -1.0, "stop", {}, round_id=round_id))
        ids = tx.add_completions(completions)
        tx.add_pairs([Pair(round_id, prompt_id, ids[2 * i], ids[2 * i + 1], "random")
                      for i, prompt_id in enumerate(prompt_ids)])
        tx.finish_step(round_id, "paired")
    return round_id


def new_store(directory: Path) -> Store:
    return Store.create(directory / "flywheel.duckdb")
