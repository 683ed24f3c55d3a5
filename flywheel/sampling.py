"""Sampling with vLLM. One engine lives as long as the sampler; new weights load in place,
and on a GPU the engine sleeps while the trainer has the card."""

from __future__ import annotations

import signal
import threading
import time
from array import array
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Sequence

from flywheel.config import SampleConfig
from flywheel.errors import EngineDiedError, UserError
from flywheel.prompts import PromptRenderer, load_renderer
from flywheel.training import free_accelerator_memory
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


@dataclass(frozen=True)
class EngineEvent:
    """What the engine did: start, reload (detail: the checkpoint), sleep, wake; or a sleep
    it could not do (name 'sleep', detail saying why)."""

    name: str
    detail: str
    at: datetime  # naive UTC, when it began
    seconds: float
    # GPU memory in use on the device (every process) as it began, where measured: read
    # before a sleep, it is what the awake engine held, which the phase's own start and
    # end readings miss (`flywheel.phases.PhaseLog`).
    device_bytes: int | None = None


def device_bytes_in_use() -> int | None:
    """Bytes in use on the current CUDA device by every process; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return total - free


def sleep_mode_available() -> bool:
    """Whether this vLLM can sleep: CUDA (and ROCm, XPU) builds; not vLLM's CPU build."""
    from vllm.platforms import current_platform

    return current_platform.is_sleep_mode_available()


class VLLMSampler:
    """n seeded completions per prompt from a checkpoint, as `Completion` records.

    Starting an engine costs tens of seconds on CPU, so the first `sample` starts one and
    later calls with another checkpoint of the same architecture reload its weights in
    place (`flywheel.vllm_worker.CheckpointReload`), in a fraction of an engine start.

    `sleep()` frees the GPU for the trainer (vLLM sleep mode, level 1: weights offloaded
    to host memory, KV cache dropped); the next `sample` wakes the engine and always
    reloads the checkpoint from disk, since weights woken without a reload can be garbage
    (vLLM #29341). What the engine did is kept for the round to record (`take_events`).
    """

    def __init__(self, config: SampleConfig, seed: int = 0) -> None:
        self.config = config
        self.seed = seed
        self._llm = None
        self._loaded: Path | None = None
        self._asleep = False
        self._sampled_since_sleep = False  # what `sleep` would free, or say it could not
        self._renderer: PromptRenderer | None = None
        self._stop_token_ids: list[int] = []
        self._events: list[EngineEvent] = []

    def take_events(self) -> list[EngineEvent]:
        """The engine events since the last call, oldest first."""
        events, self._events = self._events, []
        return events

    @contextmanager
    def _event(self, name: str, detail: str, device_bytes: int | None = None) -> Iterator[None]:
        at, started = datetime.now(timezone.utc).replace(tzinfo=None), time.perf_counter()
        yield
        self._events.append(EngineEvent(name, detail, at, time.perf_counter() - started, device_bytes))

    def sleep(self) -> None:
        """Free the engine's GPU memory until the next `sample` (a no-op when no engine
        runs, or nothing was sampled since the last call). Where vLLM cannot sleep, or
        `sample.sleep_mode` is off, the engine keeps its memory and an event says so."""
        if self._llm is None or not self._sampled_since_sleep:
            return
        self._sampled_since_sleep = False
        if not self._sleeps():
            reason = "sample.sleep_mode is off" if not self.config.sleep_mode else "this vLLM build has no sleep mode"
            self._events.append(EngineEvent("sleep", f"skipped: {reason}; the engine keeps its memory",
                                            datetime.now(timezone.utc).replace(tzinfo=None), 0.0))
            return
        with self._event("sleep", "level 1: weights offloaded to host memory, KV cache freed",
                         device_bytes_in_use()):
            self._watched(lambda: self._llm.sleep(level=1), "going to sleep", "rerun to resume the round")
        self._asleep = True

    def _sleeps(self) -> bool:
        return self.config.sleep_mode and sleep_mode_available()

    def _load(self, checkpoint_path: Path) -> None:
        checkpoint_path = Path(checkpoint_path).resolve()
        if self._loaded == checkpoint_path and not self._asleep:
            return
        if self._llm is None:
            try:
                from vllm import LLM
            except ImportError as error:
                raise UserError(
                    "vLLM is not installed: install flywheel with the 'cpu' or 'gpu' extra"
                ) from error
            with self._event("start", str(checkpoint_path)):
                self._llm = LLM(model=str(checkpoint_path), **self.engine_arguments())
            # Every checkpoint of a run is trained from the first, and saved with its tokenizer.
            self._renderer = load_renderer(checkpoint_path)
            self._stop_token_ids = stop_token_ids(checkpoint_path, self._renderer.tokenizer)
        else:
            resume = "rerun to resume the round"
            if self._asleep:
                # Whatever happens next, the engine may hold GPU memory again: a later
                # `sleep` must not skip it.
                self._sampled_since_sleep = True
                free_accelerator_memory()  # the trainer's cached blocks, for the engine
                # The weights' memory first, the KV cache after the reload (TRL's order): the
                # reload's buffers and the cache are never held at once.
                with self._event("wake", "weights"):
                    self._watched(lambda: self._llm.wake_up(tags=["weights"]), "waking", resume)
            with self._event("reload", str(checkpoint_path)):
                self._watched(lambda: self._llm.collective_rpc(
                    "flywheel_reload_checkpoint", kwargs={"weights_path": str(checkpoint_path)}),
                    f"loading {checkpoint_path}", resume)
            if self._asleep:
                with self._event("wake", "kv_cache"):
                    self._watched(lambda: self._llm.wake_up(tags=["kv_cache"]), "waking", resume)
                self._asleep = False
            # Cached prefixes hold keys and values of the old weights.
            self._llm.reset_prefix_cache()
        self._loaded = checkpoint_path

    def engine_arguments(self) -> dict:
        """`vllm.LLM`'s arguments besides the model, from `sample.*`."""
        return dict(
            seed=self.seed,
            dtype=self.config.dtype,
            max_model_len=self.config.max_model_len,
            gpu_memory_utilization=self.config.gpu_memory_utilization,
            enforce_eager=self.config.enforce_eager,
            tensor_parallel_size=self.config.tensor_parallel_size,
            enable_sleep_mode=self._sleeps(),
            worker_extension_cls="flywheel.vllm_worker.CheckpointReload",
            **cpu_engine_arguments(),
        )

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
        self._sampled_since_sleep = True
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
        """`LLM.generate`, or EngineDiedError when the engine process dies meanwhile."""
        return self._watched(lambda: self._llm.generate(token_prompts, sampling, use_tqdm=progress), "sampling",
                             "the batch it was sampling was not stored: rerun to resume the round")

    def _watched(self, call, doing: str, consequence: str):
        """`call()`'s result, or EngineDiedError when the engine process dies meanwhile.

        vLLM 0.32 waits for ever when its engine process dies in the middle of a call (its
        monitor marks the engine dead but wakes no waiting caller: an engine killed by the
        out-of-memory killer would hang the round), for sampling as for a sleep, a wake or
        a reload. So the call runs on a thread while this one watches the engine processes."""
        from vllm.v1.engine.exceptions import EngineDeadError

        outcome: dict = {}

        def run() -> None:
            try:
                outcome["value"] = call()
            except BaseException as error:  # handed to the calling thread
                outcome["error"] = error

        caller = threading.Thread(target=run, name="flywheel-vllm-call", daemon=True)
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
            self._llm, self._loaded, self._asleep = None, None, False
            raise EngineDiedError(f"the vLLM engine stopped while {doing}: {cause}; {consequence}") from error
        if error is not None:
            raise error
        return outcome.get("value")

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
            self._asleep = False
