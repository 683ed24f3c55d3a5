"""`flywheel run --config FILE`: a YAML file validated into FlywheelConfig, every mistake one line."""

import json
import re
from pathlib import Path

import pytest

import cli.main as cli
from flywheel.config import (EvalConfig, JudgeConfig, PairConfig, SampleConfig, TrainConfig, check_override_keys,
                             dotted_keys, load_config_file, load_run_config, override_run_file, parse_value,
                             write_config_file)
from flywheel.errors import UserError
from flywheel.preflight import check_engine_settings, model_context_length
from test_cli import assert_one_line_error, flywheel

FULL = """\
workdir: runs/mine
reference_model: ~/models/sft
prompts: data/train.jsonl
heldout_prompts: /data/heldout.jsonl
rounds: 3
seed: 7
judge:
  spec: rule:flywheel.examples.addition:addition_score
  options: {name: addition-verifier}
  batch_size: 64
sample: {prompts_per_round: 128, n: 8, temperature: 0.7, max_tokens: 32, max_model_len: 256, enforce_eager: true}
pair: {strategy: all, max_pairs_per_round: 300}
train:
  beta: 1              # an int where a float is expected
  steps_per_round: 40
  learning_rate: 3e-5  # YAML 1.1 would read this as a string
  batch_size: 16
  gradient_accumulation_steps: 2
  lora_rank: 8
  dtype: bfloat16
eval:
  samples_per_prompt: 2
  promotion_margin: 0.01
  accuracy_score: flywheel.examples.addition:addition_score
  judge: {spec: "llm:judge-model", options: {max_tokens: 8}}
"""

REQUIRED = "workdir: w\nreference_model: m\nprompts: p.jsonl\nheldout_prompts: h.jsonl\njudge: human\n"


def write(tmp_path: Path, text: str, name: str = "flywheel.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def error_of(path: Path) -> str:
    with pytest.raises(UserError) as caught:
        load_config_file(path)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_full_file_loads_with_paths_from_its_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the cwd must not matter
    path = write(tmp_path, FULL, "configs/flywheel.yaml")
    run_file = load_config_file(path)
    config, here = run_file.config, tmp_path / "configs"
    assert run_file.rounds == 3
    assert config.workdir == here / "runs" / "mine"
    assert config.prompts.path == here / "data" / "train.jsonl"
    assert config.heldout_prompts.path == Path("/data/heldout.jsonl")
    assert config.reference_model == Path.home() / "models" / "sft"
    assert config.seed == 7
    assert config.judge == JudgeConfig("rule:flywheel.examples.addition:addition_score", {"name": "addition-verifier"}, 64)
    assert config.sample == SampleConfig(prompts_per_round=128, n=8, temperature=0.7, max_tokens=32,
                                         max_model_len=256, enforce_eager=True)
    assert config.pair == PairConfig("all", max_pairs_per_round=300)
    assert config.train == TrainConfig(beta=1.0, learning_rate=3e-5, batch_size=16, gradient_accumulation_steps=2,
                                       lora_rank=8, dtype="bfloat16", steps_per_round=40)
    assert isinstance(config.train.beta, float)
    assert config.eval == EvalConfig(samples_per_prompt=2, promotion_margin=0.01,
                                     accuracy_score="flywheel.examples.addition:addition_score",
                                     judge=JudgeConfig("llm:judge-model", {"max_tokens": 8}))


def test_judge_shorthand_and_defaults(tmp_path):
    run_file = load_config_file(write(tmp_path, REQUIRED.replace("judge: human", "judge: reward-model:rm")
                                      + "eval: {judge: 'rule:m:f'}\n"))
    assert run_file.rounds == 1  # RunFile's default
    assert run_file.config.judge == JudgeConfig("reward-model:rm")
    assert run_file.config.eval.judge == JudgeConfig("rule:m:f")
    assert run_file.config.train == TrainConfig() and run_file.config.sample == SampleConfig()


@pytest.mark.parametrize("text, expected", [
    (REQUIRED + "bogus: 1\n", "unknown key 'bogus' (the top level takes: workdir, reference_model"),
    (REQUIRED + "train: {betta: 0.2}\n", "unknown key 'train.betta' (train takes: beta, learning_rate"),
    (REQUIRED.replace("judge: human", "judge: {spec: human, batchsize: 2}"), "unknown key 'judge.batchsize'"),
    (REQUIRED + "train: {beta: -0.1}\n", "train.beta must be > 0, got -0.1"),
    (REQUIRED + "train: {epochs: 2, steps_per_round: 10}\n", "set train.epochs or train.steps_per_round, not both"),
    (REQUIRED + "pair: {max_pairs_per_round: 0}\n", "pair.max_pairs_per_round must be >= 1"),
    (REQUIRED + "train: {batch_size: big}\n", "train.batch_size must be an integer, got 'big'"),
    (REQUIRED + "train: {batch_size: true}\n", "train.batch_size must be an integer, got true"),
    (REQUIRED + "train: {gradient_checkpointing: 1}\n", "train.gradient_checkpointing must be true or false, got 1"),
    (REQUIRED + "train: {bf16: true}\n", "'train.bf16' is gone: use train.dtype: bfloat16"),
    (REQUIRED + "train: {dtype: float16}\n",
     "train.dtype must be one of ('auto', 'bfloat16', 'float32'), got 'float16'"),
    (REQUIRED + "sample: {tensor_parallel_size: 0}\n", "sample.tensor_parallel_size must be >= 1, got 0"),
    (REQUIRED + "train: [1, 2]\n", "train must be a mapping, got a list"),
    (REQUIRED + "seed: null\n", "seed must be an integer, got null"),
    (REQUIRED + "eval: {accuracy_score: 5}\n", "eval.accuracy_score must be a string, got 5"),
    (REQUIRED.replace("workdir: w", "workdir: [w]"), "workdir must be a path (a string), got a list"),
    (REQUIRED.replace("judge: human", "judge: {spec: human, options: [a]}"),
     "judge.options must be a mapping with string keys, got a list"),
    (REQUIRED + "eval: {judge: nocolon}\n", "eval.judge.spec must be 'human', one of"),
    (REQUIRED + "rounds: 0\n", "rounds must be >= 1, got 0"),
    (REQUIRED.replace("judge: human\n", ""), "missing required key 'judge'"),
    ("judge: human\n", "missing required keys 'workdir', 'reference_model', 'prompts', 'heldout_prompts'"),
    (REQUIRED + "train:\n  beta: 0.1\n   lr: 2\n", "not valid YAML (line 8: mapping values are not allowed here)"),
    (REQUIRED + "train: {beta: 0.1}\ntrain: {beta: 0.2}\n", "not valid YAML (line 7: duplicate key 'train')"),
    ("# only a comment\n", "the file is empty"),
    ("- workdir: w\n", "the top level must be a mapping of keys (workdir, "),
])
def test_mistakes_are_one_line_naming_file_and_key(tmp_path, text, expected):
    message = error_of(write(tmp_path, text))
    assert message.startswith(f"{tmp_path / 'flywheel.yaml'}: "), message
    assert expected in message, message


def test_nonexistent_file(tmp_path):
    assert error_of(tmp_path / "nope.yaml") == f"config file {tmp_path / 'nope.yaml'} does not exist"


# -- through the command line -------------------------------------------------------------


def test_cli_unknown_key_and_bad_value(tmp_path):
    path = write(tmp_path, REQUIRED + "train: {betta: 0.2}\n")
    assert_one_line_error(flywheel("run", "--config", str(path)), "unknown key 'train.betta'")
    path = write(tmp_path, REQUIRED + "train: {beta: -0.1}\n")
    result = flywheel("run", "--config", str(path), "--rounds", "2")
    assert_one_line_error(result, f"flywheel: error: {path}: train.beta must be > 0, got -0.1")


def test_cli_flags_and_overrides_set_the_files_keys(tiny_policy, tmp_path, monkeypatch):
    # Flags are short for keys, and no longer refused beside --config: they override the
    # file's keys, and KEY=VALUE overrides come after them. Their paths are from the cwd.
    calls = []
    monkeypatch.setattr(cli, "_run_flywheel", lambda *args: calls.append(args))
    monkeypatch.setattr(cli, "_print_round_table", lambda database: None)
    (tmp_path / "configs").mkdir()
    path = _runnable(tmp_path / "configs", tiny_policy, "human")
    (tmp_path / "other.jsonl").write_text(json.dumps({"prompt": "2+2="}) + "\n")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "--config", str(path), "--judge", "rule:flywheel.examples.addition:addition_score",
                     "--prompts", "other.jsonl", "--pairing", "all", "train.beta=0.2", "--rounds", "2",
                     "sample.n=8", "rounds=3", "judge.options.name=verifier"]) == 0
    [(config, rounds, judge, _)] = calls
    assert rounds == 3  # rounds=3 came after --rounds 2
    assert config.prompts.path == tmp_path / "other.jsonl" and config.heldout_prompts.path == tmp_path / "configs" / "prompts.jsonl"
    assert config.judge == JudgeConfig("rule:flywheel.examples.addition:addition_score", {"name": "verifier"})
    assert judge.name == "verifier"
    assert (config.pair.strategy, config.train.beta, config.sample.n) == ("all", 0.2, 8)


@pytest.mark.parametrize("overrides, expected", [
    (["train.betta=0.2"], "override train.betta=0.2: unknown key 'train.betta' (train takes: beta, learning_rate"),
    (["trian.beta=0.2"], "override trian.beta=0.2: unknown key 'trian' (the top level takes: workdir, "),
    (["train.beta=abc"], "override train.beta=abc: train.beta must be a number, got 'abc'"),
    (["train.beta=-1"], "override train.beta=-1: train.beta must be > 0, got -1.0"),
    (["train.beta=0.2", "train.beta=0"], "override train.beta=0: train.beta must be > 0, got 0.0"),
    (["sample.n.x=1"], "override sample.n.x=1: sample.n is a single value, so 'sample.n.x' is not a key"),
    (["rounds=0"], "override rounds=0: rounds must be >= 1, got 0"),
    (["beta"], "'beta' is not KEY=VALUE with a dotted key (e.g. train.beta=0.2)"),
    (["judge.spec=nocolon"], "override judge.spec=nocolon: judge.spec must be 'human', one of"),
    (["train={beta: 0}"], "override train={beta: 0}: train.beta must be > 0, got 0.0"),
])
def test_cli_override_mistakes_are_one_line_naming_the_key(tmp_path, overrides, expected):
    path = write(tmp_path, REQUIRED)
    assert_one_line_error(flywheel("run", "--config", str(path), *overrides), f"flywheel: error: {expected}")


def test_cli_without_config_names_missing_keys(tmp_path):
    result = flywheel("run", "--model", "m", "--prompts", "p.jsonl", "--score", "flywheel.examples.addition:addition_score")
    assert_one_line_error(result, "missing required keys 'workdir', 'heldout_prompts', 'judge'")


def _runnable(tmp_path, tiny_policy, judge: str) -> Path:
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "1+1="}) + "\n")
    return write(tmp_path, f"workdir: w\nreference_model: {tiny_policy}\nprompts: prompts.jsonl\n"
                           f"heldout_prompts: prompts.jsonl\njudge: {judge}\nrounds: 4\n")


def test_cli_judge_that_does_not_import(tiny_policy, tmp_path):
    path = _runnable(tmp_path, tiny_policy, "nosuchpackage.judges:MyJudge")
    assert_one_line_error(flywheel("run", "--config", str(path)), "judge 'nosuchpackage.judges:MyJudge' does not import")
    assert not (tmp_path / "w").exists()  # refused before anything was created


@pytest.mark.parametrize("flags, rounds", [([], 4), (["--rounds", "2"], 2), (["rounds=5"], 5)])
def test_cli_runs_the_file_config(tiny_policy, tmp_path, monkeypatch, flags, rounds):
    calls = []
    monkeypatch.setattr(cli, "_run_flywheel", lambda *args: calls.append(args))
    monkeypatch.setattr(cli, "_print_round_table", lambda database: None)
    path = _runnable(tmp_path, tiny_policy, "rule:flywheel.examples.addition:addition_score")
    assert cli.main(["run", "--config", str(path), *flags]) == 0
    [(config, ran_rounds, judge, eval_judge)] = calls
    assert ran_rounds == rounds
    assert config.workdir == tmp_path / "w" and config.prompts.path == tmp_path / "prompts.jsonl"
    assert judge.name == "rule:flywheel.examples.addition:addition_score" and eval_judge is None


# -- overrides, written configs, engine checks, the demo's files ----------------------------


def test_overrides_in_python(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, REQUIRED.replace("judge: human", "judge: rule:m:f") + "train: {beta: 0.3, epochs: 2}\n")
    run_file = load_run_config(path, [("heldout_prompts", "elsewhere/h.jsonl")],
                               ["train={learning_rate: 1e-4}", "judge.options={name: v, batch_size: 4}",
                                "eval.judge.spec=rule:m:g", "eval.judge.options.name=g", "pair.max_pairs_per_round=null"])
    config = run_file.config
    assert (config.train.beta, config.train.epochs, config.train.learning_rate) == (0.3, 2, 1e-4)  # merged
    assert config.judge == JudgeConfig("rule:m:f", {"name": "v", "batch_size": 4})
    assert config.eval.judge == JudgeConfig("rule:m:g", {"name": "g"})
    assert config.heldout_prompts.path == tmp_path / "elsewhere" / "h.jsonl" and config.prompts.path == tmp_path / "p.jsonl"
    assert override_run_file(run_file, overrides=["train.beta=0.5"]).config.train == TrainConfig(
        beta=0.5, epochs=2, learning_rate=1e-4)
    with pytest.raises(UserError, match="override train.nope=1: unknown key 'train.nope'"):
        check_override_keys(overrides=["train.nope=1"])
    assert "train.loss_type" in dotted_keys() and "judge.options" in dotted_keys() and "rounds" in dotted_keys()


@pytest.mark.parametrize("text, value", [("0.2", 0.2), ("3e-4", 3e-4), ("true", True), ("null", None),
                                         ("[a, b]", ["a", "b"]), ("'8'", "8"), ("Which: A or B?", "Which: A or B?"),
                                         ("a #b", "a #b"), ("rule:m:f", "rule:m:f")])
def test_override_values_are_read_as_yaml_scalars(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


def test_written_config_reads_back_the_same(tmp_path):
    run_file = load_config_file(write(tmp_path, FULL, "configs/flywheel.yaml"))
    path = write_config_file(tmp_path / "configs" / "copy.yaml", run_file, header="# a copy\n")
    text = path.read_text()
    assert text.startswith("# a copy\nworkdir: runs/mine\nreference_model: ")
    assert "prompts: data/train.jsonl\nheldout_prompts: /data/heldout.jsonl\nrounds: 3\n" in text
    assert load_config_file(path) == run_file


def _model(tmp_path, config: dict, tokenizer: dict | None = None) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(config))
    if tokenizer is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    return tmp_path


@pytest.mark.parametrize("config, tokenizer, expected", [
    ({"max_position_embeddings": 64}, None, (64, "max_position_embeddings = 64 in its config.json")),
    ({"n_positions": 1024, "max_position_embeddings": 2048}, None, (1024, "n_positions = 1024 in its config.json")),
    ({"max_position_embeddings": 4096, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}, None,
     (8192, "max_position_embeddings = 4096 in its config.json, times its RoPE scaling factor 2")),
    ({"max_position_embeddings": 4096, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, None,
     (4096, "max_position_embeddings = 4096 in its config.json")),
    ({"max_position_embeddings": 4096}, {"model_max_length": 512},
     (512, "model_max_length = 512 in its tokenizer_config.json")),
    ({"text_config": {"max_position_embeddings": 32}}, None, (32, "max_position_embeddings = 32 in its config.json")),
    ({"hidden_size": 8}, None, None),
])
def test_model_context_length(tmp_path, config, tokenizer, expected):
    assert model_context_length(_model(tmp_path, config, tokenizer)) == expected


def test_engine_settings(tmp_path, monkeypatch):
    model = _model(tmp_path, {"max_position_embeddings": 64})

    def check(**changes):
        settings = {"max_model_len": 64, "max_tokens": 8, "dtype": "float32", "gpu_memory_utilization": 0.3, **changes}
        check_engine_settings(model, "sample", **settings)

    check()
    check(max_model_len=None, dtype="BFloat16", gpu_memory_utilization=1)  # None: the model's own context
    for changes, message in [({"max_model_len": 65}, "sample.max_model_len (65) is longer than the context of"),
                             ({"max_tokens": 64}, "sample.max_tokens (64) must be less than sample.max_model_len (64)"),
                             ({"dtype": "fp8"}, "sample.dtype must be one of"),
                             ({"gpu_memory_utilization": 0}, "sample.gpu_memory_utilization must be in (0, 1]"),
                             ({"max_model_len": "lots"}, "sample.max_model_len must be an integer >= 2, got 'lots'")]:
        with pytest.raises(UserError, match=re.escape(message)):
            check(**changes)
    monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")  # vLLM's own escape hatch
    check(max_model_len=4096)


def test_sample_config_refuses_what_vllm_would():
    with pytest.raises(UserError, match=re.escape("sample.max_tokens (64) must be less than sample.max_model_len (64)")):
        SampleConfig(max_tokens=64)
    with pytest.raises(UserError, match="sample.dtype must be one of"):
        SampleConfig(dtype="float64")


def test_demo_lays_out_its_files_and_writes_the_config_it_runs(tiny_policy, tmp_path):
    from conftest import TEST_POLICY
    from flywheel.examples.addition import DEMO_ROUNDS, prepare_demo

    directory = tmp_path / "flywheel-demo"
    run_file = prepare_demo(directory, TEST_POLICY, tiny_policy.parent, print, [("rounds", 2)], ["train.beta=0.3"])
    assert (directory / "policy").is_symlink() and (directory / "policy").resolve() == tiny_policy.resolve()
    assert (directory / "prompts" / "train.jsonl").is_file() and (directory / "prompts" / "heldout.jsonl").is_file()
    config = run_file.config
    assert run_file.rounds == 2 != DEMO_ROUNDS and config.train.beta == 0.3
    assert config.workdir == directory and config.prompts.path == directory / "prompts" / "train.jsonl"
    written = (directory / "flywheel.yaml").read_text()
    assert "\nworkdir: .\nreference_model: policy\nprompts: prompts/train.jsonl\n" in written
    assert load_config_file(directory / "flywheel.yaml") == run_file
    # Again, as a rerun of the demo does: the same files, the link kept.
    assert prepare_demo(directory, TEST_POLICY, tiny_policy.parent, print).rounds == DEMO_ROUNDS
    assert (directory / "policy").resolve() == tiny_policy.resolve()
    (directory / "policy").unlink()
    (directory / "policy").mkdir()
    with pytest.raises(UserError, match="is in the way of the demo policy's link"):
        prepare_demo(directory, TEST_POLICY, tiny_policy.parent, print)
