"""GRPO step benchmark: real `GRPOTrainer` steps on the embedded model with LoRA, TRL's own paths next to ours.

Every row is `trl.GRPOTrainer` training SmolLM2-135M-Instruct (the embedded default model, float32) with a PEFT LoRA
adapter (r=16, alpha=32, q/k/v/o), `beta=0.02` (a reference pass with the adapter disabled), 2 prompts x 4
generations per step, temperature 0.7, in its own subprocess (its own threads, memory and vLLM state). Rows:

- `trl`: TRL's built-in generation (`use_vllm=False`, `model.generate` on the PEFT model);
- `ours-hf`: `rollout_func()`, this project's Hugging Face backend on the trainer's model (LoRA folded for decoding);
- `ours-vllm`: `rollout_func(inference=InferenceModule(MODEL, backend="vllm", enforce_eager=True, dtype="float32",
  kv_cache_memory_bytes=...))`, an in-process vLLM engine that gets the trainer's weights at each step, with the
  mismatch correction on (TRL's default `sequence_mask`; its scoring pass with the trainer's model is part of the
  generation phase);
- `ours-vllm-uncorrected`: the same with `vllm_importance_sampling_correction=False` (no scoring pass);
- `trl-vllm`: TRL's vLLM colocate mode (`use_vllm=True, vllm_mode="colocate"`), run as TRL ships it: where it fails
  on the CPU build the row records the failure instead of a time;
- `trl-tools` / `ours-tools`: TRL's tool loop (`GRPOTrainer(tools=[calculator])`, `max_tool_calling_iterations=1`)
  and ours (`rollout_func(tools=[calculator], tool_parser="hermes", tool_loop=ToolLoopConfig(max_tool_turns=1))`) on
  the arithmetic task (`tasks.arithmetic.make_problems(few_shot=True, tool_parser="hermes")`). Both rows use
  `SMOLLM2_TOOLS_TEMPLATE`: SmolLM2's own chat format plus tool rendering (see there for why), so both render the
  prompt with `apply_chat_template(tools=...)` and generate from the same tokens (the table shows prompt tokens per
  step). TRL parses responses with its hermes-style `trl.chat_template_utils.qwen3_template`, set as the tokenizer's
  `response_template`. The table shows each row's call rate;
- `ours-vllm-tools`: our tool loop on the in-process vLLM engine of `ours-vllm` (the same task and template).

Shapes: `short` (64 new tokens, short chat questions), `long` (512 new tokens, requests for long answers: generation
dominates), both for the first four rows; `tools` (the tool rows, 64 tokens per completion, tool results included).
A row's shapes run one after the other in its process: `long` follows `short` in a warm process, so its one step is
measured; elsewhere the first step is the warm-up and the table shows medians of steps 2..N.

Each step is split into phases, timed with public hooks only (a `TrainerCallback`, torch module and tensor hooks):

- step: `on_step_begin` to `on_step_end` (generation, scoring, loss, backward and optimizer; logging excluded);
- generation: from the step's start to the start of its first log-prob pass (TRL's `_generate`: tokenization,
  generation or the `rollout_func`, decoding, tool calls, weight sync for vLLM rows);
- ref/old: the no-grad log-prob passes (TRL calls the model with `fused_lm_head=True`; the reference pass with the
  adapter disabled, plus the old-policy pass where TRL runs one, i.e. with `use_vllm=True`);
- loss fwd: the grad-enabled forward of the loss (backbone and TRL's fused LM head log-probs);
- backward: from the moment the gradient reaches the model's log-probs output (tensor hook) to the last LoRA
  parameter's gradient (post-accumulate-grad hooks);
- other: the rest (rewards, advantages, the loss on the log-probs forward and backward, clipping, optimizer step).

Generation tokens/s counts model-generated completion tokens (TRL's `completions/mean_length`, which excludes tool
tokens) over the generation phase. A `torch.matmul` float32 GEMM runs in the same run (its own subprocess, before and
after the rows); decode efficiency is generation tokens/s x 2 x parameters (the base model's 134.5M, LoRA excluded,
attention-score FLOPs excluded) over the GEMM peak.

    python benchmarks/grpo_step.py           # every row and shape (13 min on an idle 2-core machine)
    python benchmarks/grpo_step.py --quick   # trl and ours-hf, 16 new tokens, 2 steps (47 s)
    python benchmarks/grpo_step.py --quick --rows ours-vllm,trl-tools,ours-tools   # any rows, tiny settings
    python benchmarks/grpo_step.py --shapes short,tools                              # without the long shape (8 min)

Of the full run's 13 minutes the long shape takes 5 (one 512-token step each of TRL, ours-hf and ours-vllm: 134,
92 and 78 s in a trial), the tool rows 4, the TRL colocate row 1 (its engine compiles before it fails).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from benchmarks._results import append_results, peak_rss_mib
from benchmarks.generation import SMOLLM2_PROMPTS

ROWS: dict[str, str] = {
    "trl": "TRL built-in generation (`use_vllm=False`)",
    "ours-hf": "ours `rollout_func()`, Hugging Face backend",
    "ours-vllm": "ours `rollout_func(inference=vLLM in-process)`",
    "ours-vllm-uncorrected": "the same, mismatch correction off",
    "trl-vllm": "TRL vLLM colocate (`use_vllm=True`)",
    "trl-tools": "TRL tool loop (`tools=[calculator]`)",
    "ours-tools": "ours `rollout_func(tools=[calculator])`",
    "ours-vllm-tools": "ours `rollout_func(inference=vLLM in-process, tools=[calculator])`",
}
REFERENCE_ROW = {"short": "trl", "long": "trl", "tools": "trl-tools"}
LONG_PROMPTS = (
    "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how the water cycle works, with examples from different climates.",
    "Write a long essay on the history of the printing press and how it changed Europe.",
    "Describe, step by step and in detail, how to plan a two-week trip through Japan.",
    "Write a detailed guide to starting a vegetable garden, from soil to harvest.",
    "Explain in depth how a computer executes a program, from source code to transistors.",
    "Write a long letter from a sailor to his family describing a year at sea.",
    "Give a detailed overview of the causes and consequences of the French Revolution.",
)
SMOLLM2_TOOLS_TEMPLATE = (
    r"{%- if messages[0]['role'] == 'system' -%}"
    r"{%- set system = messages[0]['content'] -%}{%- set rest = messages[1:] -%}"
    r"{%- else -%}"
    r"{%- set system = 'You are a helpful AI assistant named SmolLM, trained by Hugging Face' -%}"
    r"{%- set rest = messages -%}"
    r"{%- endif -%}"
    r"{{- '<|im_start|>system\n' + system -}}"
    r"{%- if tools -%}"
    r"{{- '\n\nYou can call the following tools:\n' -}}"
    r"{%- for tool in tools -%}"
    r"{{- (tool.function if tool.function is defined else tool) | tojson -}}{{- '\n' -}}"
    r"{%- endfor -%}"
    r"{{- '\nTo call a tool, write exactly:\n<tool_call>\n"
    r"{\"name\": \"<tool name>\", \"arguments\": {\"<argument>\": <value>}}\n</tool_call>\n"
    r"Call several tools by repeating the format. If no tool is needed, answer directly.' -}}"
    r"{%- endif -%}"
    r"{{- '<|im_end|>\n' -}}"
    r"{%- for message in rest -%}"
    r"{%- if message.role == 'assistant' and message.tool_calls -%}"
    r"{{- '<|im_start|>assistant\n' + (message.content or '') -}}"
    r"{%- for call in message.tool_calls -%}"
    r"{%- set f = call.function if call.function is defined else call -%}"
    r"{%- set arguments = f.arguments if f.arguments is string else f.arguments | tojson -%}"
    r"""{{- '<tool_call>\n{"name": "' + f.name + '", "arguments": ' + arguments + '}\n</tool_call>' -}}"""
    r"{%- endfor -%}"
    r"{{- '<|im_end|>\n' -}}"
    r"{%- else -%}"
    r"{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' -}}"
    r"{%- endif -%}"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)
"""SmolLM2's chat format (its template, which ignores `tools=`, renders exactly the same without tools) plus tools.

With tools, the system message lists them and shows the hermes call format (the text of `tools.prompting.
tool_preamble`); assistant `tool_calls` render as `<tool_call>` JSON and tool results as a `tool` turn, as SmolLM2's
template renders any role. TRL's tool loop needs a template that renders `tool_calls` (`supports_tool_calling`), which
SmolLM2's does not; TRL's Qwen2.5 template would do, but with it SmolLM2 answers the worked example's pattern with
`<tool_response>` and makes almost no calls (0 of 32 completions in a trial at T=0.7), while here about 40% of the
completions make a well-formed call.
"""
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
NUM_PROMPTS, NUM_GENERATIONS, TEMPERATURE, BETA = 2, 4, 0.7, 0.02
VLLM_KV_CACHE_BYTES = 1 << 30
CORRECTION_METRICS = (
    "sampling/importance_sampling_ratio/min",
    "sampling/importance_sampling_ratio/mean",
    "sampling/importance_sampling_ratio/max",
    "sampling/raw_importance_sampling_ratio/mean",
    "sampling/importance_sampling_masked_fraction",
    "sampling/sampling_logp_difference/max",
)
"""The mismatch correction's metrics kept per step (see `trl_inference_ext.trl.correction`)."""
CONTENTION = 0.75  # a step whose CPU s is under this x threads x wall s waited on other processes


@dataclass(frozen=True)
class Plan:
    """What one run measures: the rows of each shape, steps and token budgets.

    Rows run in `ROWS` order, one process each, with all their shapes in that process in `SHAPES` order: a row's
    `long` shape follows its `short` one in a warm process, so `warm_steps` (fewer, all measured) are enough there.
    """

    rows: dict[str, tuple[str, ...]]
    steps: dict[str, int]
    warm_steps: dict[str, int]
    max_new_tokens: dict[str, int]
    gemm_size: int


SHAPES = ("short", "long", "tools")
FULL = Plan(
    rows={
        "short": ("trl", "ours-hf", "ours-vllm", "ours-vllm-uncorrected", "trl-vllm"),
        "long": ("trl", "ours-hf", "ours-vllm", "trl-vllm"),
        "tools": ("trl-tools", "ours-tools", "ours-vllm-tools"),
    },
    steps={"short": 3, "long": 2, "tools": 3},
    warm_steps={"short": 2, "long": 1, "tools": 2},
    max_new_tokens={"short": 64, "long": 512, "tools": 64},
    gemm_size=2048,
)
QUICK = Plan(
    rows={"short": ("trl", "ours-hf")},
    steps={"short": 2, "long": 2, "tools": 2},
    warm_steps={"short": 1, "long": 1, "tools": 1},
    max_new_tokens={"short": 16, "long": 64, "tools": 48},
    gemm_size=1024,
)


# ------------------------------------------------------------------------------------------------ phase timing
class PhaseTimer:
    """Per-step phase times of a `GRPOTrainer`, from public hooks (see the module docstring for the phases).

    Use `callback()` as one of the trainer's callbacks and `attach(trainer)` once the trainer exists. The model
    hooks sit on the causal LM under the PEFT wrapper, the module TRL gives its fused LM head and calls with
    `fused_lm_head=True` for every log-prob pass; its generation calls (`model.generate`) come without it.
    """

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.current: dict[str, Any] | None = None
        self._open: list[tuple[float, bool, bool]] = []

    @staticmethod
    def now() -> float:
        return time.perf_counter()

    def attach(self, trainer: Any) -> None:
        """Registers the forward hooks on the trainer's causal LM and gradient hooks on its trainable parameters."""
        model = trainer.model
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        inner.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        inner.register_forward_hook(self._after_forward, with_kwargs=True)
        for param in model.parameters():
            if param.requires_grad:
                param.register_post_accumulate_grad_hook(self._gradient_done)

    def callback(self) -> Any:
        """A `TrainerCallback` that opens and closes the step records."""
        from transformers import TrainerCallback

        timer = self

        class _StepCallback(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                timer.begin_step()

            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                timer.end_step(int(state.global_step))

        return _StepCallback()

    def begin_step(self) -> None:
        self.current = {
            "t0": self.now(),
            "cpu0": time.process_time(),
            "first_pass": None,
            "score_s": 0.0,
            "score_passes": 0,
            "loss_fwd_s": 0.0,
            "bwd_start": None,
            "bwd_end": None,
            "rollout_s": 0.0,
            "generate_forwards": 0,
        }

    def _before_forward(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        import torch

        self._open.append((self.now(), bool(kwargs.get("fused_lm_head")), torch.is_grad_enabled()))

    def _after_forward(self, module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        start, fused, grad = self._open.pop()
        step = self.current
        if step is None:
            return
        if not fused:
            step["generate_forwards"] += 1
            return
        if step["first_pass"] is None:
            step["first_pass"] = start
        if not grad:
            step["score_s"] += self.now() - start
            step["score_passes"] += 1
            return
        step["loss_fwd_s"] += self.now() - start
        log_probs = getattr(output, "log_probs", None)
        if log_probs is not None and log_probs.requires_grad:
            log_probs.register_hook(self._backward_reached_model)

    def _backward_reached_model(self, grad: Any) -> None:
        if self.current is not None and self.current["bwd_start"] is None:
            self.current["bwd_start"] = self.now()

    def _gradient_done(self, param: Any) -> None:
        if self.current is not None:
            self.current["bwd_end"] = self.now()

    def add_rollout_time(self, seconds: float) -> None:
        """Adds the wall time of one `rollout_func` call to the current step."""
        if self.current is not None:
            self.current["rollout_s"] += seconds

    def end_step(self, global_step: int) -> None:
        step, self.current = self.current, None
        if step is None:
            return
        end = self.now()
        total = end - step["t0"]
        generation = (step["first_pass"] or end) - step["t0"]
        backward = step["bwd_end"] - step["bwd_start"] if step["bwd_start"] and step["bwd_end"] else 0.0
        record = {
            "step": global_step,
            "step_s": total,
            "cpu_s": time.process_time() - step["cpu0"],
            "generation_s": generation,
            "score_s": step["score_s"],
            "score_passes": step["score_passes"],
            "loss_fwd_s": step["loss_fwd_s"],
            "backward_s": backward,
            "other_s": total - generation - step["score_s"] - step["loss_fwd_s"] - backward,
            "rollout_s": step["rollout_s"],
            "generate_forwards": step["generate_forwards"],
        }
        self.steps.append(record)


def timed_rollout(rollout: Callable[[list[Any], Any], dict[str, Any]], timer: PhaseTimer) -> Callable[..., Any]:
    """Wraps a `rollout_func` so that its wall time is added to the current step (a cross-check of generation)."""

    def wrapped(prompts: list[Any], trainer: Any) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            return rollout(prompts, trainer)
        finally:
            timer.add_rollout_time(time.perf_counter() - start)

    return wrapped


class CallCounter:
    """Wraps a reward function to count, per call (= per step), completions and the well-formed tool calls they made.

    Our `rollout_func` passes its parsed calls as the `tool_calls` column (counted: status `"ok"`); TRL's tool loop
    returns conversational completions whose assistant messages carry the `tool_calls` its parser found.
    """

    def __init__(self, reward: Callable[..., list[float]]) -> None:
        self.reward = reward
        self.__name__ = getattr(reward, "__name__", "reward")
        self.calls: list[dict[str, int]] = []

    def __call__(self, completions: list[Any], **kwargs: Any) -> list[float]:
        if kwargs.get("tool_calls") is not None:
            per_completion = [sum(c.get("status") == "ok" for c in calls or []) for calls in kwargs["tool_calls"]]
        else:
            per_completion = [
                sum(
                    len(m.get("tool_calls") or [])
                    for m in (c if isinstance(c, list) else [])
                    if isinstance(m, dict) and m.get("role") == "assistant"
                )
                for c in completions
            ]
        self.calls.append(
            {
                "completions": len(completions),
                "calls": sum(per_completion),
                "with_call": sum(n > 0 for n in per_completion),
            }
        )
        return self.reward(completions=completions, **kwargs)


def distinct_token_reward(completion_ids: list[list[int]], **kwargs: Any) -> list[float]:
    """Share of distinct tokens in each completion: cheap, and neutral about length."""
    return [len(set(ids)) / max(1, len(ids)) for ids in completion_ids]


# ------------------------------------------------------------------------------------------------- the worker
def build_dataset(shape: str, steps: int) -> Any:
    """The prompts of a shape, enough for `steps` steps of `NUM_PROMPTS` prompts."""
    from datasets import Dataset

    from trl_inference_ext.tasks.arithmetic import make_problems

    count = max(8, NUM_PROMPTS * steps)
    if shape == "tools":
        return Dataset.from_list(make_problems(count, seed=0, few_shot=True, tool_parser="hermes"))
    texts = LONG_PROMPTS if shape == "long" else SMOLLM2_PROMPTS
    return Dataset.from_list([{"prompt": [{"role": "user", "content": texts[i % len(texts)]}]} for i in range(count)])


def cpu_memory_utilization(extra_bytes: int) -> float:
    """The `vllm_gpu_memory_utilization` that gives TRL's colocated CPU engine about `extra_bytes` of KV cache.

    On the CPU build this value is a share of the NUMA node's memory, from which the process's resident memory at
    engine start is subtracted (here: the trainer's, measured now, plus a margin for the engine's weights).
    """
    import psutil

    total = psutil.virtual_memory().total
    resident = psutil.Process().memory_info().rss
    return min(0.9, (resident + 2 * extra_bytes) / total)


def _failure(exc: BaseException) -> str:
    """`Type: first line of the message`, with the innermost TRL frame when the error went through TRL."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    trl_frames = [f for f in traceback.extract_tb(exc.__traceback__) if f"{os.sep}trl{os.sep}" in f.filename]
    where = ""
    if trl_frames:
        frame = trl_frames[-1]
        where = f" (in TRL's `{frame.filename.rsplit(os.sep + 'trl' + os.sep, 1)[1]}:{frame.lineno}` {frame.name})"
    return f"{type(exc).__name__}: {message}{where}"


def run_worker(row: str, shapes: list[tuple[str, int, int]], out: Path) -> None:
    """Trains `row` at each `(shape, steps, max_new_tokens)` in turn, in this process, and writes the reports to `out`.

    Each shape gets a fresh model, adapter and trainer; an in-process vLLM engine (`ours-vllm`) is started once and
    serves every shape. A shape after the first runs in a warm process (`"warm": true`): its first step is measured.
    Once a shape fails, the later ones are not run (they would fail the same way).
    """
    import torch

    reports: dict[str, dict[str, Any]] = {}
    context: dict[str, Any] = {}
    failed = None
    for index, (shape, steps, max_new_tokens) in enumerate(shapes):
        report: dict[str, Any] = {"row": row, "shape": shape, "max_new_tokens": max_new_tokens, "steps": []}
        report["warm"] = index > 0
        reports[shape] = report
        if failed is not None:
            report["error"] = f"not run: the {failed} shape failed"
        else:
            try:
                _train(row, shape, steps, max_new_tokens, report, context)
            except BaseException as exc:
                report["error"] = "not runnable: " + _failure(exc)
                failed = shape
                print(traceback.format_exc(), file=sys.stderr, flush=True)
                if isinstance(exc, KeyboardInterrupt):
                    raise
            report["threads"] = torch.get_num_threads()
            gc.collect()
        usage = resource.getrusage(resource.RUSAGE_SELF)  # written after each shape: a later timeout keeps these
        summary = {"reports": reports, "process_cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mib": peak_rss_mib()}
        out.write_text(json.dumps(summary))


def _train(
    row: str, shape: str, steps: int, max_new_tokens: int, report: dict[str, Any], context: dict[str, Any]
) -> None:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from trl_inference_ext.default_model import default_model_path
    from trl_inference_ext.tasks.arithmetic import calculator, correct_answer_reward
    from trl_inference_ext.trl import ToolLoopConfig, rollout_func

    torch.manual_seed(0)
    folder = str(default_model_path())
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if shape == "tools":
        tokenizer.chat_template = SMOLLM2_TOOLS_TEMPLATE
    if row == "trl-tools":
        # TRL's hermes-style (`<tool_call>` JSON) response parser, the format ours parses with `tool_parser="hermes"`:
        # TRL picks one itself only for chat templates it knows.
        from trl.chat_template_utils import qwen3_template

        tokenizer.response_template = qwen3_template
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    report["parameters"] = sum(p.numel() for p in model.parameters())
    report["load_s"] = time.perf_counter() - start

    timer = PhaseTimer()
    reward = CallCounter(correct_answer_reward if shape == "tools" else distinct_token_reward)
    config: dict[str, Any] = dict(
        output_dir=tempfile.mkdtemp(prefix="grpo_step_"),
        max_steps=steps,
        num_generations=NUM_GENERATIONS,
        per_device_train_batch_size=NUM_PROMPTS * NUM_GENERATIONS,
        max_completion_length=max_new_tokens,
        temperature=TEMPERATURE,
        beta=BETA,
        learning_rate=1e-5,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    kwargs: dict[str, Any] = {}
    if row == "trl-vllm":
        config.update(
            use_vllm=True,
            vllm_mode="colocate",
            vllm_gpu_memory_utilization=cpu_memory_utilization(VLLM_KV_CACHE_BYTES),
            vllm_max_model_length=1024,
        )
    if row == "trl-tools":
        kwargs["tools"] = [calculator]
        config["max_tool_calling_iterations"] = 1
    if row == "ours-vllm-uncorrected":
        config["vllm_importance_sampling_correction"] = False
    reward_funcs: list[Any] = [reward]
    if row.startswith("ours"):
        inference = context.get("inference")
        if row.startswith("ours-vllm") and inference is None:
            from trl_inference_ext import InferenceModule

            begin = time.perf_counter()
            inference = context["inference"] = InferenceModule(
                folder,
                backend="vllm",
                enforce_eager=True,
                dtype="float32",
                kv_cache_memory_bytes=VLLM_KV_CACHE_BYTES,
                max_model_len=1024,
            )
            report["engine_start_s"] = time.perf_counter() - begin
        with_tools = row.endswith("-tools")
        tool_loop = ToolLoopConfig(max_tool_turns=1)
        tools = {"tools": [calculator], "tool_parser": "hermes", "tool_loop": tool_loop} if with_tools else {}
        rf = rollout_func(inference=inference, **tools)
        reward_funcs = [*rf.reward_funcs, reward]  # the correction's metrics reach the logs through these
        kwargs["rollout_func"] = timed_rollout(rf, timer)

    begin = time.perf_counter()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=GRPOConfig(**config),
        train_dataset=build_dataset(shape, steps),
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM"
        ),
        callbacks=[timer.callback()],
        **kwargs,
    )
    report["trainer_init_s"] = time.perf_counter() - begin
    if row == "trl-vllm":
        report["engine_start_s"] = report["trainer_init_s"]
    timer.attach(trainer)
    try:
        trainer.train()
    finally:
        logs = {int(e["step"]): e for e in trainer.state.log_history if "completions/mean_length" in e}
        previous_tokens = 0.0
        for i, record in enumerate(timer.steps):
            entry = logs.get(record["step"], {})
            n = NUM_PROMPTS * NUM_GENERATIONS
            record["model_tokens"] = entry.get("completions/mean_length", 0.0) * n
            seen = float(entry.get("num_tokens", 0.0))
            record["prompt_tokens"] = seen - previous_tokens - record["model_tokens"]
            previous_tokens = seen
            record["clipped_ratio"] = entry.get("completions/clipped_ratio")
            for name in CORRECTION_METRICS:
                if name in entry:
                    record[name] = entry[name]
            if i < len(reward.calls):
                record.update(reward.calls[i])
        report["steps"] = timer.steps


# ------------------------------------------------------------------------------------------------------ GEMM
def run_gemm(size: int, out: Path, repeats: int = 10) -> None:
    """Best float32 `torch.matmul` throughput of `size` x `size` matrices on all threads, in GFLOP/s."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    c = torch.empty(size, size)
    torch.matmul(a, b, out=c)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b, out=c)
        best = min(best, time.perf_counter() - start)
    out.write_text(json.dumps({"gflops": 2 * size**3 / best / 1e9, "size": size, "threads": torch.get_num_threads()}))


# ------------------------------------------------------------------------------------------------------ driver
def spawn(args: list[str], out: Path, timeout: float, log: Path, threads: int | None = None) -> dict[str, Any]:
    """Runs this script as a worker subprocess and returns its JSON report (or the failure).

    `threads` sets `OMP_NUM_THREADS` in the worker (torch's default, one per core, when `None`).
    """
    command = [sys.executable, str(Path(__file__).resolve()), *args, "--out", str(out)]
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    try:
        with log.open("w") as f:
            proc = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, check=False, env=env)
        code: int | str = proc.returncode
    except subprocess.TimeoutExpired:
        code = f"timed out after {timeout:.0f} s"
    wall = time.perf_counter() - start
    if out.exists():
        report = json.loads(out.read_text())
    else:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
        report = {"error": f"worker exited ({code}): " + " | ".join(tail)[-400:], "steps": []}
    report["process_s"] = wall
    return report


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(report: dict[str, Any], gemm_gflops: float) -> dict[str, Any]:
    """Medians of every phase over the measured steps, the derived rates, and the call rates.

    Measured: steps 2..N, or all steps in a warm process (a shape run after another one in the same process) or when
    there is only one.
    """
    steps = report.get("steps") or []
    measured = steps if report.get("warm") or len(steps) == 1 else steps[1:]
    out: dict[str, Any] = {"measured_steps": [s["step"] for s in measured]}
    for key in ("step_s", "cpu_s", "generation_s", "score_s", "loss_fwd_s", "backward_s", "other_s", "rollout_s"):
        out[key] = median([s[key] for s in measured])
    for key in ("model_tokens", "prompt_tokens", "score_passes"):
        out[key] = median([float(s.get(key, 0.0)) for s in measured])
    rates = [s["model_tokens"] / s["generation_s"] for s in measured if s["generation_s"] > 0]
    out["tokens_per_s"] = median(rates)
    # Call rates over every step (the warm-up step's calls count as much as any): more completions, steadier rates.
    completions = sum(s.get("completions", 0) for s in steps)
    out["completions"] = completions
    out["calls_per_completion"] = sum(s.get("calls", 0) for s in steps) / completions if completions else None
    out["with_call"] = sum(s.get("with_call", 0) for s in steps) / completions if completions else None
    flops_per_token = 2 * report.get("parameters", 0)
    out["gemm_fraction"] = out["tokens_per_s"] * flops_per_token / (gemm_gflops * 1e9) if gemm_gflops else None
    for name in CORRECTION_METRICS:
        values = [s[name] for s in steps if s.get(name) is not None]
        reduce = min if name.endswith("/min") else max if name.endswith("/max") else statistics.mean
        out[name] = reduce(values) if values else None
    threads = report.get("threads", 1)
    out["waited"] = [s["cpu_s"] < CONTENTION * threads * s["step_s"] for s in measured]
    return out


def format_shape_table(shape: str, reports: dict[str, dict[str, Any]], gemm_gflops: float) -> str:
    """Markdown table of one shape: one line per row, ratios to the shape's TRL row."""
    reference = REFERENCE_ROW[shape]
    summaries = {row: summarize(r, gemm_gflops) for row, r in reports.items() if not r.get("error")}
    ref = summaries.get(reference)
    tools = shape == "tools"
    head = (
        "| row | step s | vs TRL | generation s | ref/old s (passes) | loss fwd s | backward s | other s | "
        "gen tok/s | vs TRL | prompt / model tokens per step | % of GEMM peak | CPU s/step |"
        + (" calls/completion | completions with a call |" if tools else "")
        + " steps (s each) |"
    )
    lines = [head, "|" + "---|" + "---:|" * (12 + 2 * tools) + "---|"]
    for row, report in reports.items():
        name = f"{ROWS[row]} [`{row}`]"
        if report.get("error"):
            lines.append(f"| {name} | {report['error'][:300]} |" + " |" * (12 + 2 * tools))
            continue
        s = summaries[row]
        step_vs = f"{s['step_s'] / ref['step_s']:.2f}" if ref else "n/a"
        tok_vs = f"{s['tokens_per_s'] / ref['tokens_per_s']:.2f}" if ref and ref["tokens_per_s"] else "n/a"
        each = ", ".join(
            f"{x['step_s']:.1f}" + ("*" if x["cpu_s"] < CONTENTION * report.get("threads", 1) * x["step_s"] else "")
            for x in report["steps"]
        )
        fraction = f"{100 * s['gemm_fraction']:.1f}%" if s["gemm_fraction"] is not None else "n/a"
        cells = [
            name,
            f"{s['step_s']:.2f}",
            step_vs,
            f"{s['generation_s']:.2f}",
            f"{s['score_s']:.2f} ({s['score_passes']:.0f})",
            f"{s['loss_fwd_s']:.2f}",
            f"{s['backward_s']:.2f}",
            f"{s['other_s']:.2f}",
            f"{s['tokens_per_s']:.1f}",
            tok_vs,
            f"{s['prompt_tokens']:.0f} / {s['model_tokens']:.0f}",
            fraction,
            f"{s['cpu_s']:.1f}",
        ]
        if tools:
            cells += [
                f"{s['calls_per_completion']:.2f}" if s["calls_per_completion"] is not None else "n/a",
                f"{s['with_call']:.0%} of {s['completions']}" if s["with_call"] is not None else "n/a",
            ]
        cells.append(each)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_correction_table(shape: str, reports: dict[str, dict[str, Any]], gemm_gflops: float) -> str | None:
    """Markdown table of the vLLM rows of one shape: step time with the correction against without, and the logged
    ratio statistics (over every step); `None` when no row of the shape ran with the correction."""
    summaries = {row: summarize(r, gemm_gflops) for row, r in reports.items() if not r.get("error")}
    corrected = {row: s for row, s in summaries.items() if s.get("sampling/importance_sampling_ratio/mean") is not None}
    if not corrected:
        return None
    off = summaries.get("ours-vllm-uncorrected")
    lines = [
        "| row | step s | vs correction off | IS ratio min / mean / max | raw ratio mean | masked | logp diff max |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for row, s in corrected.items():
        vs = f"{s['step_s'] / off['step_s']:.2f}" if off else "n/a"
        ratio = " / ".join(f"{s[f'sampling/importance_sampling_ratio/{k}']:.4f}" for k in ("min", "mean", "max"))
        raw = s["sampling/raw_importance_sampling_ratio/mean"]
        masked, diff = s["sampling/importance_sampling_masked_fraction"], s["sampling/sampling_logp_difference/max"]
        lines.append(f"| `{row}` | {s['step_s']:.2f} | {vs} | {ratio} | {raw:.4f} | {masked:.0%} | {diff:.2e} |")
    if off:
        lines.append(f"| `ours-vllm-uncorrected` | {off['step_s']:.2f} | 1.00 | (off) | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="trl and ours-hf, 16 new tokens, 2 steps (< 1 min)")
    parser.add_argument("--rows", default=None, help=f"comma-separated rows to run, among {', '.join(ROWS)}")
    parser.add_argument("--shapes", default=None, help="comma-separated shapes among short, long, tools")
    parser.add_argument("--steps", type=int, default=None, help="GRPO steps per row (medians over steps 2..N)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of every worker (default: cores)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per row's process")
    parser.add_argument("--no-write", action="store_true", help="print only, do not append to RESULTS.md")
    parser.add_argument("--note", default=None, help="a line to add to the notes (e.g. what else ran meanwhile)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--gemm-size", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker == "gemm":
        return run_gemm(args.gemm_size, Path(args.out))
    if args.worker:
        spec = [item.split(":") for item in args.shapes.split(",")]
        return run_worker(args.worker, [(shape, int(n), int(tokens)) for shape, n, tokens in spec], Path(args.out))

    plan = QUICK if args.quick else FULL
    rows = plan.rows
    if args.rows or args.shapes:
        wanted = args.rows.split(",") if args.rows else list(ROWS)
        unknown = set(wanted) - set(ROWS)
        if unknown:
            parser.error(f"unknown rows {sorted(unknown)}; choose among {list(ROWS)}")
        shapes = args.shapes.split(",") if args.shapes else list(SHAPES)
        if set(shapes) - set(SHAPES):
            parser.error(f"unknown shapes {sorted(set(shapes) - set(SHAPES))}; choose among {list(SHAPES)}")
        rows = {shape: tuple(r for r in FULL.rows[shape] if r in wanted) for shape in SHAPES if shape in shapes}
        rows = {shape: r for shape, r in rows.items() if r}
        if not rows:
            parser.error("no row of the selected shapes matches --rows")

    tmp = Path(tempfile.mkdtemp(prefix="grpo_step_bench_"))
    load_before = os.getloadavg()[0]
    begin = time.perf_counter()
    gemm_args = ["--worker", "gemm", "--gemm-size", str(plan.gemm_size)]
    gemm = [spawn(gemm_args, tmp / "gemm0.json", 300, tmp / "gemm0.log", args.threads)]
    reports: dict[str, dict[str, dict[str, Any]]] = {shape: {} for shape in rows}
    steps_run: dict[str, set[int]] = {shape: set() for shape in rows}
    for row in ROWS:
        shapes = [shape for shape in rows if row in rows[shape]]
        if not shapes:
            continue
        spec = []
        for i, shape in enumerate(shapes):
            steps = args.steps or (plan.warm_steps if i else plan.steps)[shape]
            steps_run[shape].add(steps)
            spec.append(f"{shape}:{steps}:{plan.max_new_tokens[shape]}")
        worker = ["--worker", row, "--shapes", ",".join(spec)]
        result = spawn(worker, tmp / f"{row}.json", args.timeout, tmp / f"{row}.log", args.threads)
        for shape in shapes:
            report = result.get("reports", {}).get(shape) or {
                "error": "not runnable: " + result.get("error", "no report"),
                "steps": [],
            }
            reports[shape][row] = report
            times = ", ".join(f"{x['step_s']:.1f}" for x in report.get("steps", []))
            status = report.get("error") or f"steps {times} s"
            print(f"  {row:10} {shape:5} {status}", flush=True)
        cpu = result.get("process_cpu_s")
        print(f"  {row:10} process: {result['process_s']:.0f} s wall, {cpu or float('nan'):.0f} CPU s", flush=True)
    gemm.append(spawn(gemm_args, tmp / "gemm1.json", 300, tmp / "gemm1.log", args.threads))
    wall = time.perf_counter() - begin
    load_after = os.getloadavg()[0]
    peak = max((g.get("gflops", 0.0) for g in gemm), default=0.0)

    tables = []
    for shape, shape_reports in reports.items():
        counts = " or ".join(str(n) for n in sorted(steps_run[shape]))
        caption = (
            f"**{shape}**: {NUM_PROMPTS} prompts x {NUM_GENERATIONS} generations, up to {plan.max_new_tokens[shape]} "
            f"new tokens, T={TEMPERATURE}, {counts} step(s) per row"
        )
        tables.append(caption + "\n\n" + format_shape_table(shape, shape_reports, peak))
        correction = format_correction_table(shape, shape_reports, peak)
        if correction:
            tables.append(f"**{shape}**, mismatch correction (TRL's `sequence_mask`, clip max 3):\n\n{correction}")
    table = "\n\n".join(tables)
    print("\n" + table)
    ran = [r for shape_reports in reports.values() for r in shape_reports.values() if "parameters" in r]
    first = ran[0] if ran else {}
    parameters = first.get("parameters", 0)
    startup = "; ".join(
        f"{row} ({shape}) {r['engine_start_s']:.0f} s"
        for shape, shape_reports in reports.items()
        for row, r in shape_reports.items()
        if "engine_start_s" in r and not r.get("error")
    )
    notes = [
        f"SmolLM2-135M-Instruct (embedded default model), float32, {parameters / 1e6:.1f}M parameters, LoRA r=16 "
        f"alpha=32 on {'/'.join(LORA_TARGETS)}, beta={BETA}, learning rate 1e-5, one subprocess per row; torch "
        f"threads {first.get('threads', '?')}. Each row's shapes run in its one process (`long` right after `short`). "
        "Medians of steps 2..N of each phase, over all steps where the process was warm already (`long` after "
        "`short`) or there is one step; each phase's median on its own (they need not add up to the step's).",
        "Phases: generation = step start to the first log-prob pass (TRL's `_generate`, with the `rollout_func` or "
        "its own generation, decoding, tool calls, vLLM weight sync); ref/old = no-grad log-prob passes (reference "
        "with the adapter off; plus the old-policy pass TRL runs with `use_vllm=True`); loss fwd = grad-enabled "
        "forward; backward = gradient reaching the model's log-probs to the last LoRA gradient; other = the rest "
        "(rewards, advantages, loss math, optimizer). Timed with a `TrainerCallback`, module forward hooks, a "
        "tensor hook and post-accumulate-grad hooks; no trainer method is patched.",
        f"GEMM peak: float32 `torch.matmul` {plan.gemm_size}x{plan.gemm_size}, best of 10, "
        + " / ".join(f"{g.get('gflops', float('nan')):.0f}" for g in gemm)
        + " GFLOP/s before / after the rows; `% of GEMM peak` = generation tokens/s x 2 x "
        f"{parameters / 1e6:.1f}M FLOP per token / {peak:.0f} GFLOP/s (generation phase includes prefill and "
        "sampling; attention-score FLOPs and LoRA not counted).",
        "Tool rows: `SMOLLM2_TOOLS_TEMPLATE` (SmolLM2's chat format plus tool rendering) for both, the arithmetic "
        "task with its hermes worked example, TRL parsing with `trl.chat_template_utils.qwen3_template` "
        "(hermes-style), one tool round; calls = "
        "well-formed calls (TRL: those its parser returns; ours: status ok); model tokens exclude tool-result "
        "tokens (TRL's `completions/mean_length`); ours runs tools in worker processes (its default isolation), "
        "TRL in the trainer's thread.",
        f"Engine start (not in any step): {startup or 'no vLLM row ran'}. `ours-vllm`: in-process engine, "
        f"`enforce_eager=True`, KV cache {VLLM_KV_CACHE_BYTES >> 20} MiB, `max_model_len=1024`; `trl-vllm`: TRL's "
        "colocate engine as TRL configures it (`vllm_gpu_memory_utilization` chosen for ~1 GiB of KV cache).",
        f"Whole run {wall:.0f} s; 1-minute load average {load_before:.1f} before, {load_after:.1f} after. `*` marks "
        f"a step whose CPU s was under {CONTENTION} x threads x wall s (it waited on other processes; single-threaded "
        "parts such as tool calls and vLLM's scheduler also lower it).",
    ]
    if args.note:
        notes.insert(0, args.note)
    print("\n".join(notes))
    (tmp / "reports.json").write_text(json.dumps({"reports": reports, "gemm": gemm}, default=str))
    print(f"raw reports: {tmp / 'reports.json'}")
    if not args.no_write:
        title = "GRPO step (--quick)" if args.quick else "GRPO step"
        append_results(
            f"{title}: SmolLM2-135M-Instruct + LoRA r=16 in TRL's GRPOTrainer",
            table,
            notes="\n".join(f"- {line}" for line in notes),
            packages=("peft", "trl_inference_ext"),
        )


if __name__ == "__main__":
    main()
