"""Methods that vLLM adds to each of its workers (`worker_extension_cls`, vLLM's supported
way to extend them); the sampler calls them through `LLM.collective_rpc`."""

from __future__ import annotations


class CheckpointReload:
    def flywheel_reload_checkpoint(self, weights_path: str) -> None:
        """Load a checkpoint's weights in place, so that the engine computes exactly what a
        fresh engine on that checkpoint would.

        vLLM's `reload_weights` post-processes only the layers that received weights. On
        CPU an embedding-shaped layer multiplies through a packed copy of its weight made
        by that post-processing (`dispatch_cpu_unquantized_gemm`). A tied output head
        shares the embedding's weight and receives none of its own, so its packed copy
        would stay the first checkpoint's: the new body would sample through the old head.
        Packing every unquantized embedding again makes it follow the new weights; on a GPU
        the post-processing does nothing.
        """
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.layers.vocab_parallel_embedding import (
            UnquantizedEmbeddingMethod,
            VocabParallelEmbedding,
        )

        self.reload_weights(weights_path=weights_path)
        with set_current_vllm_config(self.vllm_config):
            for module in self.model_runner.get_model().modules():
                if isinstance(module, VocabParallelEmbedding) and isinstance(module.quant_method, UnquantizedEmbeddingMethod):
                    module.quant_method.process_weights_after_loading(module)
