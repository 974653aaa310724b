"""Former home of the worker extension, kept so that a vLLM server started by an older release (with
`--worker-extension-cls trl_inference_ext.backends.vllm_worker.WeightSyncExtension`) still finds it.

The extension lives in `trl_inference_ext.backends.vllm.server.worker`; new servers are started with that path.
"""

from .vllm.server.worker import WeightSyncExtension

__all__ = ["WeightSyncExtension"]
