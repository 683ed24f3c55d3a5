"""Prompts in: files and `datasets` sources, strings and conversations, and bad input."""

from __future__ import annotations

import json

import pytest

from flywheel.config import PromptSource
from flywheel.errors import UserError
from flywheel.prompts import conversation_text, read_prompts
from test_cli import RULE, SCORE, assert_one_line_error, flywheel

CHAT = [{"role": "system", "content": "you add."}, {"role": "user", "content": "1+2="}]


def write_jsonl(path, prompts, column="prompt"):
    path.write_text("".join(json.dumps({column: p}) + "\n" for p in prompts))
    return path


def test_conversations_and_strings_from_every_kind_of_source(tmp_path):
    import datasets

    prompts = ["3+4=", CHAT, [{"role": "user", "content": "5+6="}]]
    # datasets needs one type per column: strings and conversations go in separate sources.
    conversations = datasets.Dataset.from_dict({"question": [CHAT, prompts[2]]})
    conversations.to_parquet(str(tmp_path / "parquet" / "train.parquet"))
    conversations.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"test": conversations}).save_to_disk(str(tmp_path / "saved_dict"))
    expected = [("you add.\n\n1+2=", CHAT), ("5+6=", prompts[2])]
    sources = [
        PromptSource(dataset=str(tmp_path / "parquet"), column="question"),
        PromptSource(dataset="parquet", data_files=tmp_path / "parquet" / "*.parquet", column="question"),
        PromptSource(dataset=str(tmp_path / "saved"), column="question"),
        PromptSource(dataset=str(tmp_path / "saved_dict"), split="test", column="question"),
        PromptSource(path=tmp_path / "parquet" / "train.parquet", column="question"),
    ]
    for source in sources:
        assert [(r.text, r.messages) for r in read_prompts(source).rows] == expected, source
    mixed = read_prompts(write_jsonl(tmp_path / "mixed.jsonl", ["3+4=", "", CHAT]))
    assert [(r.row, r.text, r.messages) for r in mixed.rows] == [(1, "3+4=", None), (3, *expected[0])]
    assert mixed.empty_rows == [2]


def test_a_conversation_reads_as_text_for_judges_and_sql():
    assert conversation_text([{"role": "user", "content": "hi"}]) == "hi"
    assert conversation_text(CHAT) == "you add.\n\n1+2="
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert conversation_text(turns) == "user: a\n\nassistant: b\n\nuser: c"


@pytest.mark.parametrize("prompt, fragment", [
    ([{"role": "robot", "content": "1+1="}], "row 2: message 1 has role 'robot'; roles are system, user, assistant"),
    ([{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}],
     "row 2: the conversation ends on an assistant turn; a prompt ends on a user turn"),
    (7, "row 2: a prompt is a string or a list of messages, got int"),
    ([{"role": "user"}], "row 2: message 1 is not a {role, content} mapping of strings"),
])
def test_a_bad_row_is_one_line_naming_the_file_and_row(tmp_path, prompt, fragment):
    path = write_jsonl(tmp_path / "p.jsonl", ["1+1=", prompt])
    with pytest.raises(UserError, match="^" + str(path)) as error:
        read_prompts(path)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def run_with(tiny_policy, tmp_path, *overrides, prompts=None):
    heldout = write_jsonl(tmp_path / "heldout.jsonl", ["1+1="])
    prompt_flags = ["--prompts", str(prompts)] if prompts is not None else []
    return flywheel("run", "--model", str(tiny_policy), *prompt_flags, "--heldout", str(heldout),
                    "--judge", RULE, "--score", SCORE, "--workdir", str(tmp_path / "w"), *overrides)


@pytest.mark.parametrize("prompt, fragment", [
    ([{"role": "robot", "content": "1+1="}], "row 1: message 1 has role 'robot'"),
    ([{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}], "row 1: the conversation ends on an assistant turn"),
    (5, "row 1: a prompt is a string or a list of messages, got int"),
    # The demo policy's character tokenizer has no chat template.
    (CHAT, "row 1 is a conversation, and the tokenizer of"),
])
def test_bad_prompts_stop_the_run_in_one_line_with_nothing_stored(tiny_policy, tmp_path, prompt, fragment):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [prompt])
    result = run_with(tiny_policy, tmp_path, prompts=prompts)
    assert_one_line_error(result, fragment)
    assert str(prompts) in result.stderr
    assert not (tmp_path / "w").exists()  # refused before anything was created


def test_a_dataset_that_does_not_load_or_lacks_the_column_is_one_line(tiny_policy, tmp_path):
    import datasets

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "train.parquet").write_text("not parquet")
    result = run_with(tiny_policy, tmp_path, f"prompts={{dataset: {broken}}}")
    assert_one_line_error(result, f"prompts dataset {broken} (split train) does not load")
    good = tmp_path / "good"
    datasets.Dataset.from_dict({"question": ["1+1="]}).to_parquet(str(good / "train.parquet"))
    result = run_with(tiny_policy, tmp_path, f"prompts={{dataset: {good}}}")
    assert_one_line_error(result, f"prompts dataset {good} (split train) has no 'prompt' column (columns: ['question'])")
    assert not (tmp_path / "w").exists()


def test_a_dataset_config_is_read_relative_to_its_file(tmp_path):
    import datasets

    from flywheel.config import load_config_file, write_config_file

    datasets.Dataset.from_dict({"question": ["1+1="]}).to_parquet(str(tmp_path / "data" / "train.parquet"))
    config_file = tmp_path / "flywheel.yaml"
    config_file.write_text("workdir: w\nreference_model: m\njudge: human\nheldout_prompts: h.jsonl\n"
                           "prompts: {dataset: data, split: train, column: question}\n")
    run_file = load_config_file(config_file)
    assert run_file.config.prompts == PromptSource(dataset=str(tmp_path / "data"), column="question")
    assert run_file.config.heldout_prompts == PromptSource(path=tmp_path / "h.jsonl")
    # Written back and read again, it is the same source.
    assert load_config_file(write_config_file(tmp_path / "again.yaml", run_file)).config == run_file.config
