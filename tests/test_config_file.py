"""`flywheel run --config FILE`: a YAML file validated into FlywheelConfig, every mistake one line."""

import json
from pathlib import Path

import pytest

import cli.main as cli
from flywheel.config import EvalConfig, JudgeConfig, PairConfig, SampleConfig, TrainConfig, load_config_file
from flywheel.errors import UserError
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
  bf16: true
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
    assert config.prompts == here / "data" / "train.jsonl"
    assert config.heldout_prompts == Path("/data/heldout.jsonl")
    assert config.reference_model == Path.home() / "models" / "sft"
    assert config.seed == 7
    assert config.judge == JudgeConfig("rule:flywheel.examples.addition:addition_score", {"name": "addition-verifier"}, 64)
    assert config.sample == SampleConfig(prompts_per_round=128, n=8, temperature=0.7, max_tokens=32,
                                         max_model_len=256, enforce_eager=True)
    assert config.pair == PairConfig("all", max_pairs_per_round=300)
    assert config.train == TrainConfig(beta=1.0, learning_rate=3e-5, batch_size=16, gradient_accumulation_steps=2,
                                       lora_rank=8, bf16=True, steps_per_round=40)
    assert isinstance(config.train.beta, float)
    assert config.eval == EvalConfig(samples_per_prompt=2, promotion_margin=0.01,
                                     accuracy_score="flywheel.examples.addition:addition_score",
                                     judge=JudgeConfig("llm:judge-model", {"max_tokens": 8}))


def test_judge_shorthand_and_defaults(tmp_path):
    run_file = load_config_file(write(tmp_path, REQUIRED.replace("judge: human", "judge: reward-model:rm")
                                      + "eval: {judge: 'rule:m:f'}\n"))
    assert run_file.rounds is None
    assert run_file.config.judge == JudgeConfig("reward-model:rm")
    assert run_file.config.eval.judge == JudgeConfig("rule:m:f")
    assert run_file.config.train == TrainConfig() and run_file.config.sample == SampleConfig()


def test_readme_example_loads(tmp_path):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    example = readme.split("### Config file", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    run_file = load_config_file(write(tmp_path, example))
    assert run_file.rounds == 3 and run_file.config.prompts == tmp_path / "data" / "train.jsonl"
    assert run_file.config.train.learning_rate == 3e-5 and run_file.config.eval.judge is None


@pytest.mark.parametrize("text, expected", [
    (REQUIRED + "bogus: 1\n", "unknown key 'bogus' (the top level takes: workdir, reference_model"),
    (REQUIRED + "train: {betta: 0.2}\n", "unknown key 'train.betta' (train takes: beta, learning_rate"),
    (REQUIRED.replace("judge: human", "judge: {spec: human, batchsize: 2}"), "unknown key 'judge.batchsize'"),
    (REQUIRED + "train: {beta: -0.1}\n", "train.beta must be > 0, got -0.1"),
    (REQUIRED + "train: {epochs: 2, steps_per_round: 10}\n", "set train.epochs or train.steps_per_round, not both"),
    (REQUIRED + "pair: {max_pairs_per_round: 0}\n", "pair.max_pairs_per_round must be >= 1"),
    (REQUIRED + "train: {batch_size: big}\n", "train.batch_size must be an integer, got 'big'"),
    (REQUIRED + "train: {batch_size: true}\n", "train.batch_size must be an integer, got true"),
    (REQUIRED + "train: {bf16: 1}\n", "train.bf16 must be true or false, got 1"),
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


def test_cli_refuses_flags_the_file_covers(tmp_path):
    path = write(tmp_path, REQUIRED)
    result = flywheel("run", "--config", str(path), "--model", "m", "--bf16", "--rounds", "2")
    assert_one_line_error(result, "--model, --bf16 cannot be given with --config")


def test_cli_without_config_names_missing_flags(tmp_path):
    result = flywheel("run", "--model", "m", "--prompts", "p.jsonl", "--score", "flywheel.examples.addition:addition_score")
    assert_one_line_error(result, "run needs --heldout, --workdir (or --config FILE)")


def _runnable(tmp_path, tiny_policy, judge: str) -> Path:
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "1+1="}) + "\n")
    return write(tmp_path, f"workdir: w\nreference_model: {tiny_policy}\nprompts: prompts.jsonl\n"
                           f"heldout_prompts: prompts.jsonl\njudge: {judge}\nrounds: 4\n")


def test_cli_judge_that_does_not_import(tiny_policy, tmp_path):
    path = _runnable(tmp_path, tiny_policy, "nosuchpackage.judges:MyJudge")
    assert_one_line_error(flywheel("run", "--config", str(path)), "judge 'nosuchpackage.judges:MyJudge' does not import")
    assert not (tmp_path / "w").exists()  # refused before anything was created


@pytest.mark.parametrize("flags, rounds", [([], 4), (["--rounds", "2"], 2)])
def test_cli_runs_the_file_config(tiny_policy, tmp_path, monkeypatch, flags, rounds):
    calls = []
    monkeypatch.setattr(cli, "_run_flywheel", lambda *args: calls.append(args))
    monkeypatch.setattr(cli, "_print_round_table", lambda database: None)
    path = _runnable(tmp_path, tiny_policy, "rule:flywheel.examples.addition:addition_score")
    assert cli.main(["run", "--config", str(path), *flags]) == 0
    [(config, ran_rounds, judge, eval_judge)] = calls
    assert ran_rounds == rounds
    assert config.workdir == tmp_path / "w" and config.prompts == tmp_path / "prompts.jsonl"
    assert judge.name == "rule:flywheel.examples.addition:addition_score" and eval_judge is None
