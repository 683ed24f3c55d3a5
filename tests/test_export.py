"""`flywheel export`: preference rows in TRL's format, from a real DuckDB file.

The databases are written with the store's own writers (no model, no vLLM); the files
written are read back with `datasets.load_dataset` and one step of TRL's `DPOTrainer`
trains on them, in the standard format (strings) and in the conversational one.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from flywheel.errors import UserError
from flywheel.export import parse_round_ids, preferences_dataset, write_preferences
from judges.human import HUMAN_JUDGE_NAME
from storage import queue, tables
from storage.records import Completion, Label, Pair
from storage.store import Store

VERIFIER = "addition-verifier"
SYSTEM_TURN = {"role": "system", "content": "you add numbers."}
COLUMNS = ["prompt", "chosen", "rejected", "round_id", "pair_id", "judge", "annotator", "confidence",
           "annotator_gold_accuracy"]


def user_turns(text: str) -> list[dict[str, str]]:
    return [SYSTEM_TURN, {"role": "user", "content": text}]


def add_round(store: Store, judge: tuple[str, str], pairs: list[tuple[str, str, str]],
              conversations: bool = False) -> list[int]:
    """A round labelled for training by `judge` (name, version), with one pair per
    (prompt, completion a, completion b); returns the pair ids. With `conversations`, each
    prompt is stored as a system and a user message."""
    with store.transaction() as tx:
        if tables.reference_checkpoint(tx) is None:
            tables.add_checkpoint(tx, "/models/reference", role="reference", status="promoted")
        reference = tables.reference_checkpoint(tx).checkpoint_id
        round_id = tables.start_round(tx, reference, reference, seed=0, config={})
        tables.claim_round_judge(tx, round_id, *judge)
        texts = [prompt for prompt, _, _ in pairs]
        messages = [user_turns(text) for text in texts] if conversations else None
        if conversations:  # a conversation's text is its turns as plain text; only its messages are exported
            texts = [f"{SYSTEM_TURN['content']}\n\n{text}" for text in texts]
        prompt_ids = tables.add_prompts(tx, texts, "train", messages=messages)
        completion_ids = tables.add_completions(tx, [
            Completion(prompt_id, reference, "train", index, text, [1, 5], [7, 2], -1.0, "stop", {},
                       round_id=round_id)
            for prompt_id, (_, a, b) in zip(prompt_ids, pairs) for index, text in enumerate((a, b))])
        return tables.add_pairs(tx, [Pair(round_id, prompt_id, completion_ids[2 * i], completion_ids[2 * i + 1],
                                          "random") for i, prompt_id in enumerate(prompt_ids)])


def label(store: Store, pair_id: int, winner: str, judge: tuple[str, str], annotator: str | None = None,
          confidence: float | None = None) -> None:
    with store.transaction() as tx:
        tables.add_labels(tx, [Label(pair_id, winner, *judge, annotator=annotator, confidence=confidence)])


@pytest.fixture
def flywheel_db(tmp_path) -> Path:
    """Three rounds:
    1. plain-text prompts, trained on the verifier's labels; other judges and people
       labelled its first pair too;
    2. a conversation, trained on people's labels up to when the round stopped waiting;
       a person labelled it later still, and the verifier labelled it for comparison;
    3. one pair the verifier called a tie.
    """
    store = Store.create(tmp_path / "flywheel.duckdb")
    verifier, old_verifier, people = (VERIFIER, "1"), (VERIFIER, "0"), (HUMAN_JUDGE_NAME, "1")
    first, second, third = add_round(store, verifier, [("2+3=", "5", "6"), ("4+4=", "9", "8"), ("7+1=", "8", "7")])
    label(store, first, "a", verifier, confidence=0.9)
    label(store, first, "b", old_verifier)
    label(store, first, "b", ("llm-judge", "x"))
    label(store, first, "b", people, annotator="alice")
    label(store, first, "a", people, annotator="bob")
    label(store, second, "b", verifier)
    label(store, third, "tie", verifier)

    [chat] = add_round(store, people, [("1+1=", "2", "3")], conversations=True)
    with store.transaction() as tx:
        queue.request_labels(tx, 2, judge_version="1", labels_per_pair=2, lease_seconds=600,
                             now=datetime(2025, 1, 1))
    label(store, chat, "a", people, annotator="alice")
    label(store, chat, "both_bad", people, annotator="carol")
    with store.transaction() as tx:
        queue.close_request(tx, 2, "deadline", datetime(2025, 1, 2))
    label(store, chat, "b", people, annotator="dave")  # after the round stopped waiting: not trained on
    label(store, chat, "a", verifier)

    [tied] = add_round(store, verifier, [("5+5=", "10", "11")])
    label(store, tied, "tie", verifier)
    return store.path


def triples(dataset) -> list[tuple]:
    """(round, prompt's last turn, chosen, rejected, judge, annotator) of each row, in
    either format."""
    def text(value):
        return value if isinstance(value, str) else value[-1]["content"]
    return [(row["round_id"], text(row["prompt"]), text(row["chosen"]), text(row["rejected"]), row["judge"],
             row["annotator"]) for row in dataset]


def test_by_default_the_labels_each_round_trained_on(flywheel_db):
    dataset = preferences_dataset(flywheel_db)
    assert dataset.column_names == COLUMNS
    # Round 1's verifier picked b ("8") on 4+4=; its tie and round 3's are left out; in round
    # 2 carol's both_bad and dave's late label are left out.
    assert triples(dataset) == [
        (1, "2+3=", "5", "6", f"{VERIFIER}@1", None),
        (1, "4+4=", "8", "9", f"{VERIFIER}@1", None),
        (2, "1+1=", "2", "3", f"{HUMAN_JUDGE_NAME}@1", "alice"),
    ]
    assert dataset["confidence"] == [0.9, None, None]
    # The same pairs training reads for each round.
    store = Store.open(flywheel_db)
    for round_id in (1, 2):
        trained = [t.pair_id for t in store.read(tables.preference_triples, round_id)]
        assert [row["pair_id"] for row in dataset if row["round_id"] == round_id] == trained


def test_mixed_prompts_make_every_row_a_conversation(flywheel_db):
    rows = list(preferences_dataset(flywheel_db))
    assert rows[0]["prompt"] == [{"role": "user", "content": "2+3="}]  # plain text, turned into a user turn
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "5"}]
    assert rows[0]["rejected"] == [{"role": "assistant", "content": "6"}]
    assert rows[2]["prompt"] == user_turns("1+1=")  # as it came in, system turn and all
    assert rows[2]["chosen"] == [{"role": "assistant", "content": "2"}]


def test_plain_prompts_alone_stay_strings(flywheel_db):
    dataset = preferences_dataset(flywheel_db, rounds=[1])
    assert dataset.features["prompt"].dtype == "string"
    assert (dataset["prompt"], dataset["chosen"], dataset["rejected"]) == (["2+3=", "4+4="], ["5", "8"], ["6", "9"])


def test_all_keeps_ties_and_both_bad_with_a_winner_column(flywheel_db):
    dataset = preferences_dataset(flywheel_db, include_all=True)
    assert dataset.column_names == [*COLUMNS, "winner"]
    assert [(row["pair_id"], row["winner"]) for row in dataset] == [
        (1, "a"), (2, "b"), (3, "tie"), (4, "a"), (4, "both_bad"), (5, "tie")]
    tie = dataset[2]
    assert (tie["chosen"][0]["content"], tie["rejected"][0]["content"]) == ("8", "7")  # a, then b


def test_a_judge_by_name_is_every_version_of_it(flywheel_db):
    dataset = preferences_dataset(flywheel_db, judge=VERIFIER)
    assert [(row["pair_id"], row["judge"], row["chosen"][0]["content"]) for row in dataset] == [
        (1, f"{VERIFIER}@1", "5"), (1, f"{VERIFIER}@0", "6"), (2, f"{VERIFIER}@1", "8"), (4, f"{VERIFIER}@1", "2")]


def test_people_only_is_one_row_per_persons_label(flywheel_db):
    dataset = preferences_dataset(flywheel_db, people_only=True)
    assert [(row["pair_id"], row["annotator"], row["chosen"][0]["content"]) for row in dataset] == [
        (1, "alice", "6"), (1, "bob", "5"), (4, "alice", "2"), (4, "dave", "3")]


def test_rounds_filter(flywheel_db):
    assert preferences_dataset(flywheel_db, rounds=[2, 3])["pair_id"] == [4]
    assert preferences_dataset(flywheel_db, rounds=[3], include_all=True)["winner"] == ["tie"]


@pytest.mark.parametrize("selection, fragment", [
    ({"rounds": [2, 9, 11]}, "no round with id 9, 11"),
    ({"judge": "nobody"}, f"no labels by a judge named 'nobody'; judges with labels: {VERIFIER}, "
                          f"{HUMAN_JUDGE_NAME}, llm-judge"),
    ({"rounds": [3]}, "the 1 selected label(s) in round(s) 3 are all ties or both_bad"),
    ({"rounds": [3], "people_only": True}, "no labels by people in round(s) 3"),
    ({"judge": VERIFIER, "people_only": True}, "not both"),
])
def test_bad_selections_say_why(flywheel_db, selection, fragment):
    with pytest.raises(UserError) as error:
        preferences_dataset(flywheel_db, **selection)
    assert fragment in str(error.value)


def test_round_lists():
    assert parse_round_ids("1,2,5-7") == (1, 2, 5, 6, 7)
    assert parse_round_ids(" 3 , 1-2,2") == (1, 2, 3)
    for bad in ("", "1,,2", "a", "7-5", "1-"):
        with pytest.raises(UserError):
            parse_round_ids(bad)


@pytest.mark.parametrize("name", ["prefs.parquet", "prefs.jsonl"])
def test_written_files_load_back_as_they_were(flywheel_db, tmp_path, name):
    from datasets import load_dataset

    out = tmp_path / name
    done = write_preferences(flywheel_db, out, include_all=True)
    assert (done.rows, done.format, done.conversational, done.path) == (6, out.suffix[1:], True, out)
    loaded = load_dataset("parquet" if done.format == "parquet" else "json", data_files=str(out), split="train")
    assert loaded.to_list() == preferences_dataset(flywheel_db, include_all=True).to_list()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no scratch file left


def test_write_checks_the_destination_before_reading(tmp_path):
    with pytest.raises(UserError, match="directory .* does not exist"):
        write_preferences(tmp_path / "nope.duckdb", tmp_path / "missing" / "prefs.parquet")
    with pytest.raises(UserError, match="cannot tell the format of .*prefs.csv"):
        write_preferences(tmp_path / "nope.duckdb", tmp_path / "prefs.csv")


# -- the command line -----------------------------------------------------------------------


def flywheel(*args):
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_writes_the_selection_and_says_so(flywheel_db, tmp_path):
    out = tmp_path / "prefs.jsonl"
    result = flywheel("export", "--db", str(flywheel_db), "--out", str(out), "--rounds", "1-2", "--judge", VERIFIER)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines() == [f"wrote 4 preference rows (jsonl, conversational format) to {out}"]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["pair_id"] for row in rows] == [1, 1, 2, 4]


@pytest.mark.parametrize("args, fragment", [
    (["--db", "{tmp}/nope.duckdb", "--out", "{tmp}/p.parquet"], "no flywheel database at"),
    (["--out", "{tmp}/p.parquet", "--rounds", "1,7"], "no round with id 7"),
    (["--out", "{tmp}/p.parquet", "--rounds", "2-x"], "rounds must be ids and ranges"),
    (["--out", "{tmp}/p.parquet", "--judge", "nobody"], "no labels by a judge named 'nobody'"),
    (["--out", "{tmp}/p.parquet", "--rounds", "3"], "are all ties or both_bad (--all keeps them)"),
    (["--out", "{tmp}/no/such/dir/p.parquet"], "does not exist"),
    (["--out", "{tmp}/p.csv"], "give a path ending .parquet or .jsonl"),
    (["--out", "{tmp}/p.parquet", "--format", "csv"], "unsupported format 'csv': use parquet or jsonl"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(flywheel_db, tmp_path, args, fragment):
    before = sorted(tmp_path.iterdir())
    args = [arg.format(tmp=tmp_path) for arg in args]
    result = flywheel("export", *(["--db", str(flywheel_db)] if "--db" not in args else []), *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert sorted(tmp_path.iterdir()) == before


# -- TRL's DPOTrainer on the exported files -------------------------------------------------


def one_dpo_step(policy: Path, data_file: Path, output_dir: Path):
    """One DPOTrainer step on `data_file` from `policy` against a frozen copy of it;
    returns the trainer and the weights before the step."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    dataset = load_dataset("parquet", data_files=str(data_file), split="train")
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    before = {name: tensor.detach().clone() for name, tensor in model.named_parameters()}
    args = DPOConfig(output_dir=str(output_dir), per_device_train_batch_size=len(dataset), max_steps=1,
                     learning_rate=1e-3, beta=0.1, logging_steps=1, report_to=[], save_strategy="no",
                     use_cpu=True, bf16=False, seed=0)
    trainer = DPOTrainer(model=model, ref_model=AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32),
                         args=args, train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(policy))
    trainer.train()
    return trainer, before


def completion_logps(model, rows, column: str) -> list[float]:
    """Sum of log p(completion | prompt) over each tokenized row's `column` ids."""
    import torch

    logps = []
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["prompt_ids"] + row[column]])
            logits = model(input_ids=ids).logits[0, len(row["prompt_ids"]) - 1:-1]
            logps.append(logits.log_softmax(-1).gather(-1, torch.tensor(row[column])[:, None]).sum().item())
    return logps


def check_the_step(trainer, before) -> dict:
    """The logged loss is DPO's at policy = reference (log 2), the weights moved, and they
    moved towards the chosen answers: the implicit reward margin is now positive."""
    logged = trainer.state.log_history[0]
    assert math.isfinite(logged["loss"]) and logged["loss"] == pytest.approx(math.log(2), abs=1e-4)
    model, reference = trainer.model, trainer.ref_model
    assert any(not (parameter == before[name]).all() for name, parameter in model.named_parameters())
    rows = list(trainer.train_dataset)
    margins = [(pc - rc) - (pr - rr) for pc, pr, rc, rr in zip(
        completion_logps(model, rows, "chosen_ids"), completion_logps(model, rows, "rejected_ids"),
        completion_logps(reference, rows, "chosen_ids"), completion_logps(reference, rows, "rejected_ids"))]
    assert sum(margins) / len(margins) > 0, margins
    return logged


def addition_pairs(count: int) -> list[tuple[str, str, str]]:
    """(prompt, the sum, a near miss) of small sums."""
    return [(f"{a}+{a % 5}=", str(a + a % 5), str(a + a % 5 + 1)) for a in range(2, 2 + count)]


def test_one_dpo_step_on_an_exported_standard_file(tiny_policy, tmp_path):
    store = Store.create(tmp_path / "flywheel.duckdb")
    # Every other pair has the sum as completion b, and its label says b.
    pairs = [(prompt, right, wrong) if i % 2 == 0 else (prompt, wrong, right)
             for i, (prompt, right, wrong) in enumerate(addition_pairs(6))]
    for i, pair_id in enumerate(add_round(store, (VERIFIER, "1"), pairs)):
        label(store, pair_id, "a" if i % 2 == 0 else "b", (VERIFIER, "1"))
    out = tmp_path / "prefs.parquet"
    assert write_preferences(store.path, out).rows == 6

    trainer, before = one_dpo_step(tiny_policy, out, tmp_path / "trl")
    tokenizer = trainer.processing_class
    data = trainer.train_dataset
    assert data["prompt"] == [prompt for prompt, _, _ in addition_pairs(6)]
    # TRL closes each answer with the tokenizer's EOS, as the policy was trained to.
    assert data["chosen"] == [right + tokenizer.eos_token for _, right, _ in addition_pairs(6)]
    assert data[0]["chosen_ids"] == tokenizer("4", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    check_the_step(trainer, before)


def test_one_dpo_step_on_an_exported_conversational_file(chat_policy, tmp_path):
    from transformers import AutoTokenizer

    store = Store.create(tmp_path / "flywheel.duckdb")
    pair_ids = add_round(store, (VERIFIER, "1"), addition_pairs(6), conversations=True)
    for pair_id in pair_ids:
        label(store, pair_id, "a", (VERIFIER, "1"))
    out = tmp_path / "prefs.parquet"
    assert write_preferences(store.path, out).conversational

    trainer, before = one_dpo_step(chat_policy, out, tmp_path / "trl")
    tokenizer = AutoTokenizer.from_pretrained(chat_policy)
    first = trainer.train_dataset[0]
    assert first["prompt"] == user_turns("2+2=") and first["chosen"] == [{"role": "assistant", "content": "4"}]
    # TRL rendered the prompt with the policy's chat template (one BOS) and the answer ends
    # with the end-of-turn token, not the tokenizer's EOS.
    assert first["prompt_ids"] == tokenizer.apply_chat_template(first["prompt"], tokenize=True,
                                                                add_generation_prompt=True, return_dict=False)
    assert first["prompt_ids"].count(tokenizer.bos_token_id) == 1
    assert first["chosen_ids"] == tokenizer.convert_tokens_to_ids(["4", "<|end|>"])
    check_the_step(trainer, before)
