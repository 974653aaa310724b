"""Tool support for rollouts: parsing tool calls out of model output (see `trl_inference_ext.tools.parsers`)."""
