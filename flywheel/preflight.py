"""Checks of a run's inputs before anything slow starts (a vLLM engine, Prefect, training).

`check_run_inputs` checks every input of a config that can be checked cheaply: the model
and prompt files, the judges (built now, so one that cannot be built fails in one line),
and the engine settings against the checkpoint they will load. vLLM refuses the same
settings too, but only after tens of seconds and a long traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from flywheel.config import ENGINE_DTYPES, FlywheelConfig
from flywheel.errors import UserError

# The config.json keys vLLM takes a model's context length from (the smallest present),
# as `vllm.transformers_utils.model_arch_config_convertor.derive_max_model_len_and_key`.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
                "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")
# RoPE scalings whose `factor` vLLM does not apply again to the context length.
_ROPE_PRESCALED = ("su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")


def check_run_inputs(config: FlywheelConfig) -> tuple[Any, Any]:
    """Check every input of a run, and open (create, migrate) its database; return its
    judge and eval judge (None: the round's own), built now. Each problem is a one-line
    UserError (or JudgeError, StoreError), before vLLM or Prefect start."""
    from flywheel.checkpoints import require_checkpoint
    from flywheel.prompts import load_renderer, read_prompts
    from judges import close_judge, import_object, load_judge
    from storage.store import Store

    require_checkpoint(config.reference_model)
    check_engine_settings(config.reference_model, "sample", max_model_len=config.sample.max_model_len,
                          max_tokens=config.sample.max_tokens, dtype=config.sample.dtype,
                          gpu_memory_utilization=config.sample.gpu_memory_utilization)
    renderer = load_renderer(config.reference_model)
    for source in (config.prompts, config.heldout_prompts):
        renderer.check_can_render(source, read_prompts(source).rows)
    score = config.eval.accuracy_score
    if score is not None and not callable(import_object(score, "score function")):
        raise UserError(f"score function {score!r} is not callable")
    judge = load_judge(config.judge.spec, config.judge.options)
    eval_judge = None
    try:
        check_judge_engine(judge, "judge.options", config.sample.gpu_memory_utilization)
        if config.eval.judge is not None:
            eval_judge = load_judge(config.eval.judge.spec, config.eval.judge.options)
            check_judge_engine(eval_judge, "eval.judge.options", config.sample.gpu_memory_utilization)
        Store.create(config.database)
    except BaseException:
        for built in (judge, eval_judge):
            if built is not None:
                close_judge(built)
        raise
    return judge, eval_judge


def check_judge_engine(judge: Any, where: str, sampler_memory: float) -> None:
    """An LLM judge's engine settings (it keeps them in `engine_settings` until its engine
    starts), checked like the sampler's; its engine and the sampler's share the device."""
    settings = getattr(judge, "engine_settings", None)
    if not isinstance(settings, dict) or getattr(judge, "path", None) is None:
        return
    memory = settings.get("gpu_memory_utilization", 0.0)
    check_engine_settings(Path(judge.path), where, max_model_len=settings.get("max_model_len"),
                          max_tokens=getattr(judge, "max_tokens", None), dtype=settings.get("dtype", "auto"),
                          gpu_memory_utilization=memory)
    if sampler_memory + memory > 1:
        raise UserError(f"sample.gpu_memory_utilization ({sampler_memory}) and {where}.gpu_memory_utilization "
                        f"({memory}) add up to more than 1: the judge's engine runs beside the sampler's")


def check_engine_settings(model: Path, where: str, *, max_model_len: int | None, max_tokens: int | None,
                          dtype: Any, gpu_memory_utilization: Any) -> None:
    """What a vLLM engine would refuse for the checkpoint `model`, as one line naming the
    keys under `where` (`sample`, `judge.options`)."""
    if not isinstance(dtype, str) or dtype.lower() not in ENGINE_DTYPES:
        raise UserError(f"{where}.dtype must be one of {ENGINE_DTYPES}, got {dtype!r}")
    if (isinstance(gpu_memory_utilization, bool) or not isinstance(gpu_memory_utilization, (int, float))
            or not 0 < gpu_memory_utilization <= 1):
        raise UserError(f"{where}.gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
    if isinstance(max_model_len, str) and max_model_len.strip().isdigit():
        max_model_len = int(max_model_len)  # a judge option from the command line, as vLLM reads it
    if max_model_len is not None and (isinstance(max_model_len, bool) or not isinstance(max_model_len, int)
                                      or max_model_len < 2):
        raise UserError(f"{where}.max_model_len must be an integer >= 2, got {max_model_len!r}")
    if max_model_len is not None and max_tokens is not None and max_tokens >= max_model_len:
        raise UserError(f"{where}.max_tokens ({max_tokens}) must be less than {where}.max_model_len "
                        f"({max_model_len}): the context holds the prompt and the completion")
    context = model_context_length(model)
    if context is None or max_model_len is None or os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN") == "1":
        return
    length, source = context
    if max_model_len > length:
        raise UserError(f"{where}.max_model_len ({max_model_len}) is longer than the context of {model} "
                        f"({source}): set {where}.max_model_len to at most {length}")


def model_context_length(model: Path) -> tuple[int, str] | None:
    """The longest context a vLLM engine allows the checkpoint, and where it comes from
    (`max_position_embeddings = 64 in its config.json`); None when the checkpoint does not
    say (vLLM then takes max_model_len as given)."""
    try:
        config = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    found = [(value, key) for key in CONTEXT_KEYS
             if isinstance(value := text.get(key), (int, float)) and not isinstance(value, bool)]
    if not found:
        return None
    length, key = min(found)
    if isinstance(text.get("model_max_length"), (int, float)):  # vLLM prefers it when present
        length, key = text["model_max_length"], "model_max_length"
    source = f"{key} = {length:g} in its config.json"
    rope = text.get("rope_scaling") or text.get("rope_parameters")
    if isinstance(rope, dict):
        kind, factor = rope.get("rope_type") or rope.get("type"), rope.get("factor")
        if kind not in _ROPE_PRESCALED and isinstance(factor, (int, float)) and factor > 0 and factor != 1:
            length, source = length * factor, f"{source}, times its RoPE scaling factor {factor:g}"
    try:
        tokenizer = json.loads((Path(model) / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        tokenizer = {}
    limit = tokenizer.get("model_max_length") if isinstance(tokenizer, dict) else None
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < length:
        length, source = limit, f"model_max_length = {limit} in its tokenizer_config.json"
    return int(length), source
