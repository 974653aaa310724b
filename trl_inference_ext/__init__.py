"""trl_inference_ext: rollout generation, exact scoring and tool calling for RL training with TRL.

```python
from trl_inference_ext import create_inference_module

inference = create_inference_module("path/to/model", backend="auto")
result = inference.generate(["What is 2+2?"], max_new_tokens=32, return_logprobs=True)
```
"""

from .module import InferenceModule, ReferenceScorer, create_inference_module
from .types import GenerationResult, SamplingConfig, ToolCall

__version__ = "0.1.0"

__all__ = [
    "GenerationResult",
    "InferenceModule",
    "ReferenceScorer",
    "SamplingConfig",
    "ToolCall",
    "create_inference_module",
]
