"""Sampling benchmarks (issue 7): our vLLM sampler against transformers `generate`, and
reloading weights into a running engine against starting a new one each round.

    .venv/bin/python benchmarks/sampling.py [--layers 6] [--hidden 512] [--prompts 256] [--n 4] [--max-tokens 64]
                                            [--hf-batch 256 64]  # try several transformers batch sizes
    .venv/bin/python benchmarks/sampling.py --prompt-tokens 200   # long prompts (a prefill-heavy round)
    .venv/bin/python benchmarks/sampling.py --prompt-tokens 200 --chunked-prefill-cost
    .venv/bin/python benchmarks/sampling.py --quick        # small and fast, for development

Builds a Llama with random weights and the demo's character tokenizer, then prints
figures and ratios measured in this run:
- throughput: generated tokens per second of `flywheel.sampling.VLLMSampler.sample`
  against transformers `generate` (do_sample, temperature 1, no top-k/top-p,
  num_return_sequences=n, batched with left padding) on the same model, prompts, n and
  max new tokens; engine start is timed on its own and left out of the sampling time.
  Target: ratio >= 2.
- rounds: (a) switching the running engine to a second checkpoint (a perturbed copy:
  the next round's policy) in place plus the first sample call on it, against (b)
  closing the engine and starting a fresh sampler on that checkpoint plus the same call.
  The call is greedy, so the script also checks the samples come from the new weights:
  they must differ from the old model's and equal those of the fresh engine.

EOS: with random weights and a 16-token vocabulary, EOS would be sampled every ~16
tokens, at different places in the two samplers. The model is therefore built so that EOS
can never be chosen: one residual dimension is a constant (set in every token embedding,
never written by attention or MLP outputs), and EOS's output-embedding row reads only that
dimension with a large negative weight, so its logit is always far below the others. Both
samplers thus run every sequence to max tokens with their ordinary stopping rules (our
sampler unchanged); tokens are counted the same way in both (up to and including EOS, or
to the limit), and the table shows that every sequence reached the limit.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Residual dimension kept constant, its value, and the weight EOS's output row puts on it.
EOS_BLOCK_VALUE = 1.0
EOS_BLOCK_WEIGHT = -100.0


def block_eos(model) -> None:
    """Make EOS unreachable, as described in the module docstring (in place)."""
    import torch

    eos = model.config.eos_token_id
    dim = model.config.hidden_size - 1
    with torch.no_grad():
        model.model.embed_tokens.weight[:, dim] = EOS_BLOCK_VALUE
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[dim, :] = 0.0
            layer.mlp.down_proj.weight[dim, :] = 0.0
        model.lm_head.weight[:, dim] = 0.0
        model.lm_head.weight[eos, :] = 0.0
        model.lm_head.weight[eos, dim] = EOS_BLOCK_WEIGHT


def build_models(directory: Path, layers: int, hidden: int, max_positions: int) -> tuple[Path, Path]:
    """The policy (random weights) and a perturbed copy: the next round's checkpoint.

    Built like the demo policy (character tokenizer, 4x MLP, 64-wide heads) but with
    untied output embeddings, which the EOS block needs."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from flywheel.checkpoints import save_checkpoint
    from flywheel.examples.addition import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    heads = max(hidden // 64, 1)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_positions, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    block_eos(model)
    first = save_checkpoint(model, tokenizer, directory / "round-1")
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=noise))
    block_eos(model)
    second = save_checkpoint(model, tokenizer, directory / "round-2")
    return first, second


def make_prompts(count: int, seed: int = 0, tokens: int | None = None):
    """Addition prompts of the demo task, as the store's `Prompt` records; with `tokens`,
    sums of many one-digit operands (`3+1+4+...=`) of that many tokens, <bos> included."""
    import random

    from flywheel.examples.addition import addition_prompt
    from storage.records import Prompt

    rng = random.Random(seed)
    if tokens is None:
        texts = [addition_prompt(rng.randint(0, 99), rng.randint(0, 99)) for _ in range(count)]
    else:
        texts = ["+".join(str(rng.randint(0, 9)) for _ in range(tokens // 2))[: tokens - 2] + "=" for _ in range(count)]
    return [Prompt(prompt_id=i, text=text, split="train") for i, text in enumerate(texts)]


def generated_length(token_ids, eos: int, limit: int) -> int:
    """Tokens generated up to and including the first EOS, else up to the limit."""
    token_ids = list(token_ids)[:limit]
    return token_ids.index(eos) + 1 if eos in token_ids else len(token_ids)


def hf_generate(model_path: Path, prompts, n: int, max_tokens: int, batch_prompts: int, threads: int | None) -> dict:
    """transformers `generate`, sampling, left-padded batches of `batch_prompts` prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    eos = tokenizer.eos_token_id

    def run(batch, seed):
        encoded = tokenizer([p.text for p in batch], padding=True, return_tensors="pt", return_token_type_ids=False)
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = model.generate(
                **encoded, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=n,
                max_new_tokens=max_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
            )
        new = out[:, encoded.input_ids.shape[1]:].tolist()
        return [generated_length(row, eos, max_tokens) for row in new]

    run(prompts[: min(4, len(prompts))], seed=0)  # warm-up, not timed
    lengths = []
    started = time.perf_counter()
    for start in range(0, len(prompts), batch_prompts):
        lengths += run(prompts[start:start + batch_prompts], seed=start)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "tokens": sum(lengths), "sequences": len(lengths),
            "at_limit": sum(length == max_tokens for length in lengths)}


def vllm_tokens(completions, eos: int, limit: int) -> list[int]:
    return [generated_length(c.token_ids, eos, limit) for c in completions]


def greedy_ids(completions) -> list[tuple[int, ...]]:
    return [tuple(c.token_ids) for c in sorted(completions, key=lambda c: (c.prompt_id, c.sample_index))]


def chunked_prefill_cost(model_path: Path, prompts, n: int, max_tokens: int, max_model_len: int,
                         gpu_memory_utilization: float) -> dict[bool, float]:
    """Tokens per second of vLLM with chunked prefill on and off, unseeded (seeded requests
    crash on CPU with it on, which is why the sampler turns it off there): what turning it
    off costs. Each setting gets an engine of its own; the first call warms it up."""
    from vllm import LLM, SamplingParams

    rates = {}
    for chunked in (True, False):
        llm = LLM(model=str(model_path), dtype="float32", max_model_len=max_model_len, enforce_eager=True,
                  gpu_memory_utilization=gpu_memory_utilization, enable_chunked_prefill=chunked)
        params = SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens)
        llm.generate([p.text for p in prompts[:4]], params, use_tqdm=False)
        started = time.perf_counter()
        outputs = llm.generate([p.text for p in prompts], params, use_tqdm=False)
        seconds = time.perf_counter() - started
        rates[chunked] = sum(len(o.token_ids) for out in outputs for o in out.outputs) / seconds
        llm.llm_engine.engine_core.shutdown()
        del llm
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6, help="Llama decoder layers (default %(default)s)")
    parser.add_argument("--hidden", type=int, default=512, help="Llama hidden size (heads of 64, MLP 4x) (default %(default)s)")
    parser.add_argument("--prompts", type=int, default=256, help="prompts sampled in the throughput run (default %(default)s)")
    parser.add_argument("--n", type=int, default=4, help="completions per prompt (default %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per completion (default %(default)s)")
    parser.add_argument("--prompt-tokens", type=int, default=None,
                        help="long prompts of this many tokens each (sums of one-digit operands) instead of "
                             "the demo's two-number sums of about 6 tokens")
    parser.add_argument("--hf-batch", type=int, nargs="+", default=None,
                        help="prompts per transformers generate call; several values run several "
                             "transformers passes and the fastest is compared (default: all prompts in one call)")
    parser.add_argument("--switch-prompts", type=int, default=64,
                        help="prompts of the greedy first sample call after a checkpoint switch (default %(default)s)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.15,
                        help="vLLM's fraction of RAM for the engine and its KV cache on CPU; lower it if the "
                             "engine refuses to start for lack of free memory (default %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for transformers (default: torch's own choice)")
    parser.add_argument("--chunked-prefill-cost", action="store_true",
                        help="only measure vLLM's throughput with chunked prefill on and off (unseeded), "
                             "on this run's model and prompts")
    parser.add_argument("--quick", action="store_true",
                        help="a small fast run for development: 2 layers, hidden 128, 32 prompts, n 2, "
                             "16 tokens, 8 switch prompts (explicit flags still win)")
    args = parser.parse_args()
    if args.quick:
        given = {a.split("=")[0] for a in sys.argv[1:]}
        for flag, value in (("--layers", 2), ("--hidden", 128), ("--prompts", 32), ("--n", 2),
                            ("--max-tokens", 16), ("--switch-prompts", 8)):
            if flag not in given:
                setattr(args, flag.lstrip("-").replace("-", "_"), value)
    hf_batches = args.hf_batch or [args.prompts]

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import torch

    from flywheel.config import SampleConfig
    from flywheel.sampling import VLLMSampler

    prompts = make_prompts(args.prompts, tokens=args.prompt_tokens)
    switch_prompts = make_prompts(args.switch_prompts, seed=1, tokens=args.prompt_tokens)
    longest_prompt = 1 + max(len(p.text) for p in prompts + switch_prompts)  # + <bos>
    max_model_len = longest_prompt + args.max_tokens
    config = SampleConfig(n=args.n, max_tokens=args.max_tokens, max_model_len=max_model_len, dtype="float32",
                          gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=True)
    rows: list[tuple[str, str]] = []
    print(f"model: Llama {args.layers} layers, hidden {args.hidden}, random weights, EOS blocked; "
          f"{args.prompts} prompts of {longest_prompt} tokens at most x n={args.n} x {args.max_tokens} new tokens; "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads() if not args.threads else args.threads}",
          flush=True)

    with tempfile.TemporaryDirectory() as scratch:
        first, second = build_models(Path(scratch), args.layers, args.hidden, max_positions=max_model_len + 8)
        from transformers import AutoTokenizer
        eos = AutoTokenizer.from_pretrained(first).eos_token_id
        if args.chunked_prefill_cost:
            rates = chunked_prefill_cost(first, prompts, args.n, args.max_tokens, max_model_len,
                                         args.gpu_memory_utilization)
            print(f"vLLM, chunked prefill on: {rates[True]:.0f} tok/s; off: {rates[False]:.0f} tok/s; "
                  f"off / on = {rates[False] / rates[True]:.2f}")
            return

        # 1. transformers generate, before any engine exists so nothing competes for the cores.
        hf_runs = {}
        for batch in hf_batches:
            hf_runs[batch] = hf_generate(first, prompts, args.n, args.max_tokens, batch, args.threads)
            run = hf_runs[batch]
            print(f"transformers generate, {batch} prompts/call: {run['tokens'] / run['seconds']:.0f} tok/s "
                  f"({run['tokens']} tokens in {run['seconds']:.1f} s)", flush=True)
        best_batch = max(hf_runs, key=lambda b: hf_runs[b]["tokens"] / hf_runs[b]["seconds"])
        hf = hf_runs[best_batch]

        # 1. our sampler: importing vLLM and the engine start (first call, one prompt) are
        # timed apart from sampling.
        started = time.perf_counter()
        import vllm  # noqa: F401
        vllm_import = time.perf_counter() - started
        sampler = VLLMSampler(config, seed=0)
        started = time.perf_counter()
        sampler.sample(first, 1, prompts[:1], n=1, temperature=1.0, seed=0, purpose="train", round_id=None,
                       progress=False)
        engine_start = time.perf_counter() - started
        started = time.perf_counter()
        completions = sampler.sample(first, 1, prompts, n=args.n, temperature=1.0, seed=0, purpose="train",
                                     round_id=1, progress=False)
        vllm_seconds = time.perf_counter() - started
        lengths = vllm_tokens(completions, eos, args.max_tokens)
        ours = {"seconds": vllm_seconds, "tokens": sum(lengths), "sequences": len(lengths),
                "at_limit": sum(length == args.max_tokens for length in lengths)}
        print(f"VLLMSampler: {ours['tokens'] / ours['seconds']:.0f} tok/s "
              f"({ours['tokens']} tokens in {ours['seconds']:.1f} s; engine start {engine_start:.1f} s)", flush=True)

        # 2. greedy outputs of the old checkpoint, then (a) switch in place + first call.
        greedy = dict(n=1, temperature=0.0, seed=0, purpose="train", round_id=None, progress=False)
        old = greedy_ids(sampler.sample(first, 1, switch_prompts, **greedy))
        started = time.perf_counter()
        switched = greedy_ids(sampler.sample(second, 2, switch_prompts, **greedy))
        in_place = time.perf_counter() - started
        started = time.perf_counter()
        sampler.sample(second, 2, switch_prompts, **greedy)  # same call, weights already loaded
        call_only = time.perf_counter() - started

        # (b) close the engine, start a fresh sampler on the new checkpoint + the same call.
        started = time.perf_counter()
        sampler.close()
        closed = time.perf_counter() - started
        fresh_sampler = VLLMSampler(config, seed=0)
        fresh = greedy_ids(fresh_sampler.sample(second, 2, switch_prompts, **greedy))
        restart = time.perf_counter() - started
        fresh_sampler.close()

    differ = sum(a != b for a, b in zip(old, switched))
    equal = sum(a == b for a, b in zip(switched, fresh))
    hf_rate, vllm_rate = hf["tokens"] / hf["seconds"], ours["tokens"] / ours["seconds"]
    throughput_ratio = vllm_rate / hf_rate
    rounds_ratio = restart / in_place

    rows += [
        ("transformers generate: tokens / time",
         f"{hf['tokens']} / {hf['seconds']:.2f} s = {hf_rate:.0f} tok/s ({best_batch} prompts per call)"),
        ("transformers sequences at the token limit", f"{hf['at_limit']} / {hf['sequences']}"),
        ("VLLMSampler.sample: tokens / time", f"{ours['tokens']} / {ours['seconds']:.2f} s = {vllm_rate:.0f} tok/s"),
        ("VLLMSampler sequences at the token limit", f"{ours['at_limit']} / {ours['sequences']}"),
        ("vLLM engine start (first call, 1 prompt)", f"{engine_start:.2f} s  (importing vllm before it: {vllm_import:.1f} s)"),
        ("throughput ratio vLLM / transformers", f"{throughput_ratio:.2f}x  (target >= 2: "
                                                 f"{'met' if throughput_ratio >= 2 else 'MISSED'})"),
        ("(a) switch in place + first call", f"{in_place:.2f} s  (the call alone: {call_only:.2f} s, "
                                             f"so the reload ~{1000 * max(in_place - call_only, 0):.0f} ms)"),
        ("(b) close + fresh sampler + first call", f"{restart:.2f} s  (close {closed:.2f} s)"),
        ("rounds ratio (b) / (a)", f"{rounds_ratio:.1f}x"),
        ("greedy after switch differs from old model", f"{differ} / {len(old)} prompts"),
        ("greedy after switch equals fresh engine", f"{equal} / {len(old)} prompts"),
    ]
    if len(hf_runs) > 1:
        rows.insert(1, ("transformers tok/s by prompts per call",
                        ", ".join(f"{b}: {r['tokens'] / r['seconds']:.0f}" for b, r in hf_runs.items())))
    width = max(len(name) for name, _ in rows)
    print()
    print(f"{'measure':<{width}}  value")
    print(f"{'-' * width}  {'-' * 60}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if differ != len(old) or equal != len(old):
        print("\nWARNING: the samples after the switch do not all come from the new weights")
        sys.exit(1)


if __name__ == "__main__":
    main()
