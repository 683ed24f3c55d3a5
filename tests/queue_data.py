"""Rounds with pairs written straight into a real store, for queue tests that need no model.

The completions are made-up sums (`right` or off by one); nothing here is a fake of our
own code: the rows go through the store's ordinary writers.
"""

from __future__ import annotations

from pathlib import Path

from storage.records import Completion, Pair
from storage.store import Store
from storage import tables


def round_with_pairs(store: Store, num_pairs: int) -> int:
    """A new round with `num_pairs` pairs, each a right and a wrong answer to its own sum;
    returns the round id. Completion a is always the right answer."""
    with store.transaction() as tx:
        if tables.reference_checkpoint(tx) is None:
            tables.add_checkpoint(tx, "/models/reference", role="reference", status="promoted")
        reference = tables.reference_checkpoint(tx).checkpoint_id
        round_id = tables.start_round(tx, reference, reference, seed=tables.count(tx, "rounds") + 1, config={})
        first = tables.count(tx, "prompts")
        texts = [f"{first + i}+{i % 7}=" for i in range(num_pairs)]
        prompt_ids = tables.add_prompts(tx, texts, "train")
        completions = []
        for prompt_id, text in zip(prompt_ids, texts):
            a, b = (int(x) for x in text[:-1].split("+"))
            for index, answer in enumerate((a + b, a + b + 1)):
                completions.append(Completion(prompt_id, reference, "train", index, str(answer), [1, 5],
                                              [7, 2], -1.0, "stop", {}, round_id=round_id))
        ids = tables.add_completions(tx, completions)
        tables.add_pairs(tx, [Pair(round_id, prompt_id, ids[2 * i], ids[2 * i + 1], "random")
                      for i, prompt_id in enumerate(prompt_ids)])
        tables.finish_step(tx, round_id, "paired")
    return round_id


def new_store(directory: Path) -> Store:
    return Store.create(directory / "flywheel.duckdb")
