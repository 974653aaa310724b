"""Former home of the API-key middleware, kept so that a vLLM server started by an older release (with
`--middleware trl_inference_ext.serve_auth.APIKeyMiddleware`) still finds it.

The middleware lives in `trl_inference_ext.backends.vllm.server.auth`; new servers are started with that path.
"""

from .backends.vllm.server.auth import APIKeyMiddleware

__all__ = ["APIKeyMiddleware"]
