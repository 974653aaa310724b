"""trl_inference_ext: rollout generation, exact scoring and tool calling for RL training with TRL.

```python
from trl_inference_ext import create_inference_module

inference = create_inference_module("path/to/model", backend="auto")
result = inference.generate(["What is 2+2?"], max_new_tokens=32, return_logprobs=True)
```
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import errors
from .errors import *  # noqa: F403  (the error family: `errors.__all__`, added to `__all__` below)
from .types import GenerationResult, SamplingConfig, ToolCall

if TYPE_CHECKING:
    from .module import InferenceModule, ReferenceScorer, create_inference_module

__version__ = "0.1.0"

_LAZY = {"InferenceModule": ".module", "ReferenceScorer": ".module", "create_inference_module": ".module"}
"""Names imported on first use, so that importing a submodule (e.g. a tool in `tasks`, inside a tool worker process)
does not import torch and transformers."""


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "GenerationResult",
    "InferenceModule",
    "ReferenceScorer",
    "SamplingConfig",
    "ToolCall",
    "create_inference_module",
]
__all__ += errors.__all__
