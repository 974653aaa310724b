"""Tools in rollouts: definitions (`schema`), prompts (`prompting`), parsers (`parsers/`), isolated execution
(`execution`), the multi-turn loop (`loop.run_tool_loop`) and its settings (`ToolLoopConfig`).

May import `..types`, `..errors`, `..config_checks`, and `..module` (the loop drives an `InferenceModule`); never
`..backends` or `..trl`. Importing this package or `parsers` loads neither torch nor transformers (tool workers).
"""

from .config import ToolLoopConfig

__all__ = ["ToolLoopConfig"]
