"""`chat_template_kwargs` (TRL's `GRPOConfig.chat_template_kwargs`) reach every chat prompt this package renders.

A tiny model whose chat template reacts to `enable_thinking` (TRL's Qwen2.5 template with Qwen3's empty
`<think></think>` block after the generation prompt when `enable_thinking=False`, and TRL's own Qwen3 template): the
prompt ids of `encode_prompts`, of tool prompts, of the tool loop's tool-result turns and of `trl-inference generate
--chat` equal what TRL renders with the same kwargs, and differ without them.
"""

from __future__ import annotations

import importlib.resources
import json

import pytest
from tool_fixtures import add

from trl_inference_ext import InferenceModule, create_inference_module
from trl_inference_ext.cli import main
from trl_inference_ext.errors import InvalidTypeError, InvalidValueError
from trl_inference_ext.tools.loop import run_tool_loop
from trl_inference_ext.tools.prompting import build_tool_prompt, tool_results_text
from trl_inference_ext.tools.schema import normalize_tools

trl = pytest.importorskip("trl")
from trl.data_utils import apply_chat_template  # noqa: E402

NO_THINKING = {"enable_thinking": False}
THINK_BLOCK = "<think>\n\n</think>\n\n"
CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
CONVERSATION = [
    {"role": "user", "content": "add 2 and 3"},
    {"role": "assistant", "content": THINK_BLOCK + CALL},
    {"role": "tool", "name": "add", "content": "5"},
    {"role": "assistant", "content": THINK_BLOCK + "the answer is 5"},
]
PROMPTS = [
    [{"role": "user", "content": "add 2 and 3"}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "name a city"}],
]


def thinking_template() -> str:
    """TRL's Qwen2.5 template, whose generation prompt gains Qwen3's empty think block with `enable_thinking=False`."""
    from trl_inference_ext.testing import qwen2_5_chat_template

    opening = "{{- '<|im_start|>assistant\\n' }}\n{%- endif %}"
    template = qwen2_5_chat_template()
    assert template.count(opening) == 1
    return template.replace(
        opening,
        "{{- '<|im_start|>assistant\\n' }}\n"
        "    {%- if enable_thinking is defined and not enable_thinking %}\n"
        "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
        "    {%- endif %}\n"
        "{%- endif %}",
    )


def qwen3_template() -> str:
    """TRL's copy of the Qwen3 chat template (it renders the think block itself, and re-renders earlier turns)."""
    return importlib.resources.files("trl").joinpath("chat_templates/qwen3.jinja").read_text()


@pytest.fixture(scope="module")
def thinking_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny model with `thinking_template()`, fitted on `CONVERSATION`: a call to `add`, then the answer, each turn
    opened by the think block that `enable_thinking=False` puts after the generation prompt."""
    from transformers import AutoTokenizer

    from trl_inference_ext.testing import build_tiny_model, fit_conversations

    folder = build_tiny_model(tmp_path_factory.mktemp("thinking") / "model", seed=1)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = thinking_template()
    tokenizer.save_pretrained(folder)
    return str(fit_conversations(folder, [CONVERSATION], tools=[add], steps=200))


@pytest.fixture(scope="module")
def thinking(thinking_model_dir: str) -> InferenceModule:
    return InferenceModule(thinking_model_dir, device="cpu", dtype="float32", tool_parser="hermes")


@pytest.fixture(params=["thinking_template", "qwen3"])
def template_module(request: pytest.FixtureRequest, thinking: InferenceModule) -> InferenceModule:
    """The fixture model with either chat template, on a tokenizer of its own (the shared one stays as it is)."""
    import copy

    tokenizer = copy.deepcopy(thinking.tokenizer)
    tokenizer.chat_template = thinking_template() if request.param == "thinking_template" else qwen3_template()
    return InferenceModule.from_model(thinking.backend.model, tokenizer)  # type: ignore[attr-defined]


def trl_prompt_ids(tokenizer, prompt, **kwargs) -> list[int]:
    """The ids of a conversational prompt as TRL renders it (`trl.data_utils.apply_chat_template`)."""
    text = apply_chat_template({"prompt": prompt}, tokenizer, **kwargs)["prompt"]
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ------------------------------------------------------------------------------------------------------ prompts
def test_encode_prompts_equals_trl_with_the_kwargs_and_differs_without(template_module):
    tokenizer = template_module.tokenizer
    template_module.chat_template_kwargs = NO_THINKING
    with_kwargs = template_module.encode_prompts(PROMPTS)
    assert with_kwargs == [trl_prompt_ids(tokenizer, p, **NO_THINKING) for p in PROMPTS]
    assert all(tokenizer.decode(ids).endswith("<|im_start|>assistant\n" + THINK_BLOCK) for ids in with_kwargs)

    template_module.chat_template_kwargs = None
    assert template_module.chat_template_kwargs == {}
    without = template_module.encode_prompts(PROMPTS)
    assert without == [trl_prompt_ids(tokenizer, p) for p in PROMPTS]
    assert all(a != b for a, b in zip(with_kwargs, without))


def test_encode_prompts_equals_the_grpo_trainers_own_prompt_ids(thinking_model_dir, thinking, tmp_path):
    """The ids GRPOTrainer itself computes for generation (`_tokenize_prompts`, with `chat_template_kwargs`)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    args = trl.GRPOConfig(
        output_dir=str(tmp_path / "out"),
        chat_template_kwargs=dict(NO_THINKING),
        num_generations=2,
        per_device_train_batch_size=2,
        max_completion_length=8,
        report_to="none",
        use_cpu=True,
        bf16=False,
    )
    trainer = trl.GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(thinking_model_dir, dtype=torch.float32),
        reward_funcs=[lambda completions, **kwargs: [0.0] * len(completions)],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=thinking.tokenizer,
    )
    trainer_ids, _, _ = trainer._tokenize_prompts(PROMPTS)
    module = InferenceModule.from_model(trainer.model, thinking.tokenizer, chat_template_kwargs=NO_THINKING)
    assert module.encode_prompts(PROMPTS) == [list(ids) for ids in trainer_ids]
    module.chat_template_kwargs = dict(trainer.args.chat_template_kwargs or {})  # as the rollout function sets it
    assert module.encode_prompts(PROMPTS) == [list(ids) for ids in trainer_ids]


def test_create_inference_module_takes_the_kwargs(thinking_model_dir, thinking):
    module = create_inference_module(thinking_model_dir, backend="auto", device="cpu", chat_template_kwargs=NO_THINKING)
    assert module.backend.name == "huggingface" and module.chat_template_kwargs == NO_THINKING
    assert module.encode_prompts(PROMPTS[0]) == [trl_prompt_ids(thinking.tokenizer, PROMPTS[0], **NO_THINKING)]


# -------------------------------------------------------------------------------------------------------- tools
def test_tool_prompts_equal_trl_with_tools_and_the_kwargs(template_module):
    tokenizer = template_module.tokenizer
    schemas = normalize_tools([add])
    prompt = PROMPTS[0]
    ids = build_tool_prompt(tokenizer, prompt, schemas, "hermes", chat_template_kwargs=NO_THINKING)
    assert ids == trl_prompt_ids(tokenizer, prompt, tools=[add], **NO_THINKING)
    assert ids != build_tool_prompt(tokenizer, prompt, schemas, "hermes")

    template_module.chat_template_kwargs = NO_THINKING
    result, _ = template_module.batch_generate_with_tools(prompt, available_tools=[add], max_new_tokens=1)
    assert result.metadata["prompt_token_ids"] == [ids]


@pytest.mark.parametrize("template", ["thinking_template", "qwen3"])
def test_tool_result_turns_are_rendered_with_the_kwargs(thinking, template):
    """The text after the model's end of turn: the tool message, then the next turn opened as the kwargs say."""
    import copy

    tokenizer = copy.deepcopy(thinking.tokenizer)
    tokenizer.chat_template = thinking_template() if template == "thinking_template" else qwen3_template()
    messages = [{"role": "tool", "name": "add", "content": "5"}]
    shown = "\n<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    assert tool_results_text(tokenizer, messages, True, chat_template_kwargs=NO_THINKING) == (shown + THINK_BLOCK, True)
    assert tool_results_text(tokenizer, messages, True) == (shown, True)


def test_tool_loop_rollout_is_the_conversation_trl_renders(thinking):
    """The fitted model calls `add`, sees the result and answers: prompt, model turns and the tool-result turn (the
    environment tokens) are, token for token, the conversation rendered with the chat template."""
    thinking.chat_template_kwargs = NO_THINKING
    try:
        (rollout,) = run_tool_loop(
            thinking, [CONVERSATION[:1]], tools=[add], max_new_tokens=128, do_sample=False, tool_isolation="thread"
        )
    finally:
        thinking.chat_template_kwargs = None
    tokenizer = thinking.tokenizer
    assert rollout.finish_reason == "stop" and [r.content for r in rollout.tool_results] == ["5"]
    environment = [t for t, m in zip(rollout.completion_ids, rollout.env_mask) if m == 0]
    expected = tool_results_text(tokenizer, [CONVERSATION[2]], True, chat_template_kwargs=NO_THINKING)[0]
    assert tokenizer.decode(environment) == expected and expected.endswith(THINK_BLOCK)
    assert rollout.prompt_ids == trl_prompt_ids(tokenizer, CONVERSATION[:1], tools=[add], **NO_THINKING)
    rendered = tokenizer.apply_chat_template(
        CONVERSATION, tools=normalize_tools([add]), tokenize=True, return_dict=True
    )["input_ids"]
    sequence = rollout.prompt_ids + rollout.completion_ids
    assert sequence == rendered[: len(sequence)] and tokenizer.decode(rendered[len(sequence) :]) == "\n"


# ---------------------------------------------------------------------------------------------------------- CLI
def test_cli_chat_prompt_ids_honour_chat_template_kwargs(thinking_model_dir, thinking, tmp_path):
    rows = {}
    for name, extra in (("with", ["--chat-template-kwargs", json.dumps(NO_THINKING)]), ("without", [])):
        out = tmp_path / f"{name}.jsonl"
        assert main(["generate", "--model", thinking_model_dir, "--prompt", "add 2 and 3", "--chat", "--greedy",
                     "--max-new-tokens", "1", "--return-token-ids", "--output", str(out), *extra]) == 0  # fmt: skip
        (rows[name],) = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows["with"]["prompt_token_ids"] == trl_prompt_ids(thinking.tokenizer, PROMPTS[0], **NO_THINKING)
    assert rows["without"]["prompt_token_ids"] == trl_prompt_ids(thinking.tokenizer, PROMPTS[0])
    assert rows["with"]["prompt_token_ids"] != rows["without"]["prompt_token_ids"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{not json", "must be a JSON object"),
        ('["enable_thinking"]', "must be a JSON object"),
        ('{"tools": []}', "may not set 'tools'"),
        ('{"add_generation_prompt": false}', "may not set 'add_generation_prompt'"),
    ],
)
def test_cli_refuses_bad_chat_template_kwargs(value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", "unused", "--prompt", "x", "--chat-template-kwargs", value])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("trl-inference generate: error: argument --chat-template-kwargs:") and message in error


# --------------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("key", ["tools", "tokenize", "add_generation_prompt", "return_dict", "conversation"])
def test_keys_this_package_sets_are_refused_before_loading(key):
    with pytest.raises(InvalidValueError, match=f"`chat_template_kwargs` may not set '{key}'"):
        InferenceModule("no/such/folder", chat_template_kwargs={key: True})


@pytest.mark.parametrize("value", [["enable_thinking"], "enable_thinking=False", {1: True}])
def test_kwargs_must_be_a_dict_with_string_keys(value, thinking):
    with pytest.raises(InvalidTypeError, match="`chat_template_kwargs` must"):
        InferenceModule("no/such/folder", chat_template_kwargs=value)
    with pytest.raises(TypeError, match="`chat_template_kwargs` must"):
        thinking.chat_template_kwargs = value
    assert thinking.chat_template_kwargs == {}


def test_assigned_kwargs_are_validated_and_copied(thinking):
    with pytest.raises(ValueError, match="may not set 'tools', 'tokenize'"):
        thinking.chat_template_kwargs = {"tools": [], "tokenize": False, "enable_thinking": False}
    assert thinking.chat_template_kwargs == {}
    given = dict(NO_THINKING)
    thinking.chat_template_kwargs = given
    given["enable_thinking"] = True
    try:
        assert thinking.chat_template_kwargs == NO_THINKING
    finally:
        thinking.chat_template_kwargs = None


def test_rollout_prompt_ids_follow_the_configs_chat_template_kwargs(thinking_model_dir, thinking, tmp_path):
    """In a real GRPO step, `rollout_func()`'s prompt ids are TRL's rendering under `GRPOConfig.chat_template_kwargs`
    (a module given as `inference=` gets them set by the rollout function: `test_vllm_mismatch_correction`)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from trl_inference_ext.trl import rollout_func

    seen: list = []
    rf = rollout_func()

    def recorded(prompts, trainer):
        out = rf(prompts, trainer)
        seen.append((prompts, out))
        return out

    args = trl.GRPOConfig(
        output_dir=str(tmp_path / "out"), chat_template_kwargs=dict(NO_THINKING), num_generations=2, max_steps=1,
        per_device_train_batch_size=2, max_completion_length=4, report_to="none", use_cpu=True, bf16=False,
        save_strategy="no",
    )  # fmt: skip
    trainer = trl.GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(thinking_model_dir, dtype=torch.float32),
        reward_funcs=[lambda completions, **kwargs: [0.0] * len(completions)],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS[:1]}),
        processing_class=thinking.tokenizer,
        rollout_func=recorded,
    )
    trainer.train()
    (prompts, out), *_ = seen
    assert out["prompt_ids"] == [trl_prompt_ids(thinking.tokenizer, p, **NO_THINKING) for p in prompts]
    assert out["prompt_ids"] != [trl_prompt_ids(thinking.tokenizer, p) for p in prompts]
