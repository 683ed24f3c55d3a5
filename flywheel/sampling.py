"""Sampling with vLLM. One engine lives as long as the sampler; new weights load in place."""

from __future__ import annotations

import signal
import threading
from array import array
from pathlib import Path
from typing import Sequence

from flywheel.config import SampleConfig
from flywheel.errors import EngineDiedError, UserError
from flywheel.prompts import PromptRenderer, load_renderer
from storage.records import Completion, Prompt


def cpu_engine_arguments() -> dict:
    """Engine arguments that vLLM's CPU backend needs and GPUs do not.

    Every request carries its own seed, so a prompt's samples do not depend on its batch
    neighbours. With chunked prefill, vLLM splits a prompt across two steps whenever a
    step's token budget (4,096) runs out mid-prompt (256 prompts of 17 tokens do it), and
    then rewinds the request's generator, which a CPU `torch.Generator` cannot do
    (vLLM 0.32, `gpu_model_runner.py`: "CPU Generator does not use offset"). Without
    chunked prefill each prompt is prefilled in one step: vLLM then sets the budget to at
    least `max_model_len`, so any prompt that fits the context fits a step.
    """
    from vllm.platforms import current_platform

    return {"enable_chunked_prefill": False} if current_platform.is_cpu() else {}


def stop_token_ids(checkpoint_path: Path, tokenizer) -> list[int]:
    """The tokens a completion ends at: the tokenizer's EOS and the generation config's
    (a chat model's end-of-turn token is often only there, e.g. Llama 3's <|eot_id|>)."""
    from transformers import GenerationConfig

    ids = [tokenizer.eos_token_id]
    try:
        configured = GenerationConfig.from_pretrained(checkpoint_path).eos_token_id
    except OSError:  # no generation_config.json
        configured = None
    ids += configured if isinstance(configured, list) else [configured]
    return sorted({i for i in ids if i is not None})


# How often a sampling call checks that the engine's processes still run.
ENGINE_CHECK_SECONDS = 1.0


class VLLMSampler:
    """n seeded completions per prompt from a checkpoint, as `Completion` records.

    Starting an engine costs tens of seconds on CPU, so the first `sample` starts one and
    later calls with another checkpoint of the same architecture reload its weights in
    place (`flywheel.vllm_worker.CheckpointReload`), in a fraction of an engine start.
    """

    def __init__(self, config: SampleConfig, seed: int = 0) -> None:
        self.config = config
        self.seed = seed
        self._llm = None
        self._loaded: Path | None = None
        self._renderer: PromptRenderer | None = None
        self._stop_token_ids: list[int] = []

    def _load(self, checkpoint_path: Path) -> None:
        checkpoint_path = Path(checkpoint_path).resolve()
        if self._loaded == checkpoint_path:
            return
        if self._llm is None:
            try:
                from vllm import LLM
            except ImportError as error:
                raise UserError(
                    "vLLM is not installed: install flywheel with the 'cpu' or 'gpu' extra"
                ) from error
            self._llm = LLM(
                model=str(checkpoint_path),
                seed=self.seed,
                dtype=self.config.dtype,
                max_model_len=self.config.max_model_len,
                gpu_memory_utilization=self.config.gpu_memory_utilization,
                enforce_eager=self.config.enforce_eager,
                worker_extension_cls="flywheel.vllm_worker.CheckpointReload",
                **cpu_engine_arguments(),
            )
            # Every checkpoint of a run is trained from the first, and saved with its tokenizer.
            self._renderer = load_renderer(checkpoint_path)
            self._stop_token_ids = stop_token_ids(checkpoint_path, self._renderer.tokenizer)
        else:
            self._llm.collective_rpc("flywheel_reload_checkpoint", kwargs={"weights_path": str(checkpoint_path)})
            # Cached prefixes hold keys and values of the old weights.
            self._llm.reset_prefix_cache()
        self._loaded = checkpoint_path

    def sample(
        self,
        checkpoint_path: Path,
        checkpoint_id: int,
        prompts: Sequence[Prompt],
        *,
        n: int,
        temperature: float,
        seed: int,
        purpose: str,
        round_id: int | None,
        progress: bool = True,
    ) -> list[Completion]:
        from vllm import SamplingParams

        self._load(checkpoint_path)
        params = dict(
            n=n, temperature=temperature, top_p=self.config.top_p, max_tokens=self.config.max_tokens
        )
        # One seed per prompt, so a prompt's samples do not depend on its batch neighbours.
        # logprobs=0: the sampled token's log-prob only, so that `cumulative_logprob` is set
        # for the stale-weights check (`sampler_logprob_gap`).
        sampling = [SamplingParams(**params, seed=seed + p.prompt_id, logprobs=0,
                                   stop_token_ids=self._stop_token_ids) for p in prompts]
        # Token ids, not text: vLLM would tokenize text again, adding a second BOS to a
        # template that writes one. The stored prompt ids are then exactly what was sampled.
        token_prompts = [{"prompt_token_ids": self._renderer.ids(p.text, p.messages)} for p in prompts]
        outputs = self._generate(token_prompts, sampling, progress)
        records = []
        for prompt, output in zip(prompts, outputs):
            # Token ids as C ints: 4 bytes an id instead of about 36 in a list, and the
            # store's write copies them whole. A prompt's n samples share one
            # prompt-token array and one params dict.
            prompt_token_ids = array("i", output.prompt_token_ids)
            sampling_params = {**params, "seed": seed + prompt.prompt_id}
            for index, sample in enumerate(output.outputs):
                records.append(
                    Completion(
                        prompt_id=prompt.prompt_id,
                        checkpoint_id=checkpoint_id,
                        purpose=purpose,
                        sample_index=index,
                        text=sample.text,
                        prompt_token_ids=prompt_token_ids,
                        token_ids=array("i", sample.token_ids),
                        cumulative_logprob=sample.cumulative_logprob,
                        finish_reason=sample.finish_reason,
                        sampling_params=sampling_params,
                        round_id=round_id,
                    )
                )
        return records

    def _generate(self, token_prompts: list[dict], sampling: list, progress: bool) -> list:
        """`LLM.generate`, or EngineDiedError when the engine process dies meanwhile.

        vLLM 0.32 waits for outputs for ever when its engine process dies in the middle of
        a call (its monitor marks the engine dead but wakes no waiting caller: an engine
        killed by the out-of-memory killer would hang the round). So the call runs on a
        thread while this one watches the engine processes."""
        from vllm.v1.engine.exceptions import EngineDeadError

        outcome: dict = {}

        def generate() -> None:
            try:
                outcome["outputs"] = self._llm.generate(token_prompts, sampling, use_tqdm=progress)
            except BaseException as error:  # handed to the calling thread
                outcome["error"] = error

        caller = threading.Thread(target=generate, name="flywheel-vllm-generate", daemon=True)
        caller.start()
        while caller.is_alive():
            caller.join(timeout=ENGINE_CHECK_SECONDS)
            if caller.is_alive() and self._engine_exit_codes():
                caller.join(timeout=ENGINE_CHECK_SECONDS)  # a moment to raise EngineDeadError itself
                if caller.is_alive():
                    outcome["error"] = EngineDeadError()
                break
        error = outcome.get("error")
        if isinstance(error, EngineDeadError):
            cause = self._engine_exit_cause()
            # A dead engine cannot be used again: the next call starts a new one.
            self._llm, self._loaded = None, None
            raise EngineDiedError(
                f"the vLLM engine stopped while sampling: {cause}; the batch it was sampling "
                "was not stored: rerun to resume the round"
            ) from error
        if error is not None:
            raise error
        return outcome["outputs"]

    def _engine_processes(self) -> list:
        """The engine's processes (none where vLLM runs the engine in this process)."""
        manager = getattr(getattr(self._llm.llm_engine.engine_core, "resources", None), "engine_manager", None)
        return list(getattr(manager, "processes", []))

    def _engine_exit_codes(self) -> list[int]:
        return [p.exitcode for p in self._engine_processes() if p.exitcode is not None]

    def _engine_exit_cause(self) -> str:
        """Why the engine process ended, as far as this process can tell."""
        for process in self._engine_processes():
            process.join(timeout=5)
            if process.exitcode is not None and process.exitcode < 0:
                signal_name = signal.Signals(-process.exitcode).name
                return (f"its process was killed by {signal_name}"
                        + (" (often the kernel's out-of-memory killer)" if signal_name == "SIGKILL" else ""))
        return "it raised an error (its log above names the cause)"

    def close(self) -> None:
        if self._llm is not None:
            self._llm.llm_engine.engine_core.shutdown()
            self._llm = None
            self._loaded = None
