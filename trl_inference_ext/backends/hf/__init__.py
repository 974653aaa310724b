"""The Hugging Face transformers backend: `HuggingFaceBackend`, its sampling loop (`decoding`), CPU kernels
(`cpu_kernels`), per-turn KV cache (`turn_cache`) and decode-time LoRA folding (`lora_fold`).

May import `..base`, `..adapters`, `..options`, `...scoring`, `...types` and `...errors`; never `..vllm`.
"""

from .backend import HuggingFaceBackend

__all__ = ["HuggingFaceBackend"]
