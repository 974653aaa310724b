"""`VLLMOptions`: each option's bad type and bad range is refused naming the field and what it allows, before vLLM
is imported or any model loads; `VLLMBackend`'s keywords and `VLLMOptions`' fields stay one and the same set."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import torch

from trl_inference_ext.backends.vllm import options as options_module
from trl_inference_ext.backends.vllm.backend import VLLMBackend
from trl_inference_ext.backends.vllm.options import VLLMOptions, backend_option_names
from trl_inference_ext.errors import InvalidTypeError, InvalidValueError

SERVER = {"base_url": "http://127.0.0.1:9"}  # server mode; nothing listens there and nothing is sent

# (field, value, other options, error, message): a wrong type, then a value out of range, for every checked field.
BAD_OPTIONS = [
    ("tensor_parallel_size", "2", {}, InvalidValueError, r"`tensor_parallel_size` must be an int >= 1, got '2'"),
    ("tensor_parallel_size", True, {}, InvalidValueError, r"`tensor_parallel_size` must be an int >= 1, got True"),
    ("tensor_parallel_size", 0, {}, InvalidValueError, r"`tensor_parallel_size` must be an int >= 1, got 0"),
    ("gpu_memory_utilization", "0.5", {}, InvalidValueError, r"`gpu_memory_utilization` must be in \(0, 1\]"),
    ("gpu_memory_utilization", True, {}, InvalidValueError, r"`gpu_memory_utilization` must be in \(0, 1\]"),
    (
        "gpu_memory_utilization",
        0,
        {},
        InvalidValueError,
        r"`gpu_memory_utilization` must be in \(0, 1\] .*bytes.*, got 0",
    ),
    ("gpu_memory_utilization", 1.5, {}, InvalidValueError, r"`gpu_memory_utilization` must be in \(0, 1\] .*, got 1.5"),
    ("kv_cache_memory_bytes", 0.5, {}, InvalidValueError, r"`kv_cache_memory_bytes` must be a positive int, got 0.5"),
    ("kv_cache_memory_bytes", True, {}, InvalidValueError, r"`kv_cache_memory_bytes` must be a positive int"),
    ("kv_cache_memory_bytes", 0, {}, InvalidValueError, r"`kv_cache_memory_bytes` must be a positive int, got 0"),
    ("timeout", "10", {}, InvalidValueError, r"`timeout` must be a positive number of seconds, got '10'"),
    ("timeout", None, {}, InvalidValueError, r"`timeout` must be a positive number of seconds, got None"),
    ("timeout", 0, {}, InvalidValueError, r"`timeout` must be a positive number of seconds, got 0"),
    ("timeout", -1.0, SERVER, InvalidValueError, r"`timeout` must be a positive number of seconds, got -1.0"),
    ("max_retries", 1.5, {}, InvalidValueError, r"`max_retries` must be an int >= 0, got 1.5"),
    ("max_retries", True, {}, InvalidValueError, r"`max_retries` must be an int >= 0, got True"),
    ("max_retries", -1, SERVER, InvalidValueError, r"`max_retries` must be an int >= 0, got -1"),
    ("weight_transfer", 3, SERVER, InvalidValueError, r"`weight_transfer` must be one of \['http', 'filesystem'"),
    ("weight_transfer", "smoke", SERVER, InvalidValueError, r"must be one of \['http', 'filesystem', 'nccl'\]"),
    ("weight_transfer_dir", 5, SERVER, InvalidValueError, r"`weight_transfer_dir` must be a folder path \(a str\)"),
    ("weight_transfer_dir", Path("/tmp"), SERVER, InvalidValueError, r"`weight_transfer_dir` must be a folder path"),
    ("weight_chunk_bytes", 1.5, SERVER, InvalidValueError, r"`weight_chunk_bytes` must be a positive int, got 1.5"),
    ("weight_chunk_bytes", 0, SERVER, InvalidValueError, r"`weight_chunk_bytes` must be a positive int, got 0"),
    ("base_url", 5, {}, InvalidTypeError, r"`base_url` must be a URL string \(several comma-separated\) or a list"),
    ("base_url", "ftp://host", {}, InvalidValueError, r"`base_url` must hold http\(s\) URLs .*got 'ftp://host'"),
    ("base_url", "localhost:8000", {}, InvalidValueError, r"`base_url` must hold http\(s\) URLs"),
    ("base_url", ["http://a:1", 3], {}, InvalidValueError, r"`base_url` must hold http\(s\) URLs .*got 3"),
    ("base_url", "http://a:1,,", {}, InvalidValueError, r"`base_url` must hold http\(s\) URLs .*got ''"),
]
BAD_ENGINE_ARGUMENTS = [
    ({"logprobs_mode": "raw_logprobs"}, {}, InvalidValueError, r"`logprobs_mode` must be 'processed_logprobs'"),
    (
        {"enforce_eager": True},
        SERVER,
        InvalidValueError,
        r"\['enforce_eager'\] are options of an in-process .*vllm serve",
    ),
]
UNCHECKED = {"dtype": torch.bfloat16, "seed": None, "api_key": 1234, "sync_adapters": "yes", "trust_remote_code": 1}


def _case_id(case: tuple) -> str:
    return f"{case[0]}={case[1]!r}"


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if the tokenizer loads: every error must come before any model work."""
    import transformers

    def forbidden(*args, **kwargs):
        raise AssertionError("the tokenizer was loaded")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", forbidden)


# ---------------------------------------------------------------------------------------------- bad values
@pytest.mark.parametrize(("name", "value", "others", "error", "match"), BAD_OPTIONS, ids=map(_case_id, BAD_OPTIONS))
def test_bad_option_names_the_field_and_the_allowed_values(name, value, others, error, match):
    with pytest.raises(error, match=match):
        VLLMOptions(**others, **{name: value})


@pytest.mark.parametrize(("name", "value", "others", "error", "match"), BAD_OPTIONS, ids=map(_case_id, BAD_OPTIONS))
def test_backend_refuses_it_the_same_way_before_any_model_work(
    tiny_model_dir, no_model_load, name, value, others, error, match
):
    with pytest.raises(error, match=match):
        VLLMBackend(tiny_model_dir, **others, **{name: value})


@pytest.mark.parametrize("error", [ValueError, TypeError])
def test_errors_keep_the_builtin_they_always_were(error):
    """Wrong types of the numeric options were always `ValueError`s; a `base_url` that is no list a `TypeError`."""
    cases = [c for c in BAD_OPTIONS if issubclass(c[3], error)]
    assert cases
    for name, value, others, _, _ in cases:
        with pytest.raises(error):
            VLLMOptions(**others, **{name: value})


@pytest.mark.parametrize(("engine_kwargs", "others", "error", "match"), BAD_ENGINE_ARGUMENTS)
def test_bad_engine_arguments(tiny_model_dir, no_model_load, engine_kwargs, others, error, match):
    with pytest.raises(error, match=match):
        VLLMOptions(**others, engine_kwargs=engine_kwargs)
    with pytest.raises(error, match=match):
        VLLMBackend(tiny_model_dir, **others, **engine_kwargs)


def test_engine_kwargs_must_be_a_mapping():
    with pytest.raises(InvalidTypeError, match=r"`engine_kwargs` must be a mapping of `vllm.LLM` arguments"):
        VLLMOptions(engine_kwargs=[("enforce_eager", True)])  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [5, "", None])
def test_bad_model_name(tiny_model_dir, no_model_load, value):
    with pytest.raises(InvalidValueError, match=r"`model_name` must be a non-empty string"):
        VLLMBackend(value)


@pytest.mark.parametrize("transfer", [{"weight_transfer": "http"}, {"weight_transfer_dir": "/tmp/shared"}])
def test_weight_transfer_options_are_for_server_mode(tiny_model_dir, no_model_load, transfer):
    with pytest.raises(InvalidValueError, match=r"are options of server mode \(`base_url`\)"):
        VLLMOptions(**transfer)
    with pytest.raises(InvalidValueError, match="server mode"):
        VLLMBackend(tiny_model_dir, **transfer)


def test_inference_module_refuses_it_too(tiny_model_dir, no_model_load):
    from trl_inference_ext import InferenceModule

    with pytest.raises(ValueError, match=r"`max_retries` must be an int >= 0, got -1"):
        InferenceModule(tiny_model_dir, backend="vllm", max_retries=-1, **SERVER)


# ------------------------------------------------------------------------------------- what stays accepted
def test_unchecked_options_are_passed_on_as_given():
    """vLLM and transformers check these themselves, as before: no value that worked is refused now."""
    options = VLLMOptions(**UNCHECKED)
    assert {name: getattr(options, name) for name in UNCHECKED} == UNCHECKED


@pytest.mark.parametrize(
    "kwargs",
    [
        {"weight_chunk_bytes": 0},  # unused in-process
        {"weight_chunk_bytes": 0, "weight_transfer": "filesystem", "weight_transfer_dir": "/tmp/shared", **SERVER},
        {"base_url": ""},  # a false `base_url` means in-process
        {"base_url": [], "weight_transfer": ""},
        {"timeout": 1, "max_retries": 0, "gpu_memory_utilization": 1, "kv_cache_memory_bytes": 1},
        {"engine_kwargs": {"logprobs_mode": "processed_logprobs"}, **SERVER},  # what the backend sets anyway
    ],
)
def test_values_that_were_accepted_still_are(kwargs):
    VLLMOptions(**kwargs)


def test_server_urls():
    options = VLLMOptions(base_url=" http://a:1/, https://b:2 ")
    assert options.server_mode and options.server_urls == ["http://a:1", "https://b:2"]
    assert VLLMOptions(base_url=["http://a:1/"]).server_urls == ["http://a:1"]
    assert not VLLMOptions().server_mode and VLLMOptions().server_urls == []


def test_engine_kwargs_are_copied_without_logprobs_mode():
    given = {"enforce_eager": True, "logprobs_mode": "processed_logprobs"}
    assert VLLMOptions(engine_kwargs=given).engine_kwargs == {"enforce_eager": True}
    assert given == {"enforce_eager": True, "logprobs_mode": "processed_logprobs"}


def test_options_are_frozen_and_a_changed_copy_is_checked_again():
    options = VLLMOptions(timeout=5.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.timeout = -1.0  # type: ignore[misc]
    assert dataclasses.replace(options, timeout=7.0).timeout == 7.0
    with pytest.raises(InvalidValueError, match="`timeout`"):
        dataclasses.replace(options, timeout=-1.0)


def test_the_api_key_is_not_printed():
    assert "s3cret" not in repr(VLLMOptions(api_key="s3cret", **SERVER))


# ------------------------------------------------------------------------------------------- declarations
def test_every_field_has_help_a_rule_entry_and_a_docstring_entry():
    for option in dataclasses.fields(VLLMOptions):
        assert option.metadata["help"], option.name
        assert "check" in option.metadata, option.name
        assert f"        {option.name} (`" in VLLMOptions.__doc__, option.name


def test_backend_keywords_are_the_option_fields_with_the_same_defaults():
    """`VLLMBackend`'s explicit signature and `VLLMOptions` cannot drift apart."""
    params = inspect.signature(VLLMBackend.__init__).parameters
    keywords = {n: p.default for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
    fields = {f.name: f.default for f in dataclasses.fields(VLLMOptions) if f.name != "engine_kwargs"}
    assert keywords == fields
    assert backend_option_names() == frozenset(keywords)


def test_from_options_is_the_keyword_constructor(tiny_model_dir):
    """Server mode: the tokenizer loads from the local folder and nothing is sent to the server yet."""
    options = VLLMOptions(base_url="http://127.0.0.1:9/", api_key="k", timeout=5.0, max_retries=1, sync_adapters=False)
    backend = VLLMBackend.from_options(tiny_model_dir, options)
    assert backend.options == options == VLLMBackend(tiny_model_dir, **options.backend_kwargs()).options
    assert backend.base_url == "http://127.0.0.1:9" and backend.sync_adapters is False
    (client,) = backend.servers.clients
    assert (client.timeout, client.max_retries) == (5.0, 1)


def test_helpers_stay_importable_from_the_backend_module():
    from trl_inference_ext.backends import vllm as package
    from trl_inference_ext.backends.vllm import availability, backend

    for name in (
        "DEFAULT_CPU_KV_CACHE_BYTES",
        "DEFAULT_GPU_MEMORY_UTILIZATION",
        "backend_option_names",
        "cpu_scheduler_settings",
        "default_cpu_kv_cache_bytes",
        "engine_memory_settings",
        "engine_option_names",
        "VLLMOptions",
    ):
        assert getattr(backend, name) is getattr(options_module, name) is getattr(package, name), name
    for name in ("INSTALL_HINT", "is_vllm_usable"):
        assert getattr(backend, name) is getattr(availability, name) is getattr(package, name), name


def test_validation_does_not_import_vllm(tiny_model_dir, fresh_python):
    """In a fresh interpreter (this one may hold vLLM from another test): refused options leave vLLM unimported."""
    code = (
        "import sys\n"
        "from trl_inference_ext.backends.vllm.backend import VLLMBackend\n"
        "for kwargs in [dict(tensor_parallel_size=0), dict(kv_cache_memory_bytes=0.5), dict(timeout=0),\n"
        "               dict(logprobs_mode='raw_logprobs'), dict(weight_transfer='http'), dict(base_url='ftp://x')]:\n"
        "    try:\n"
        f"        VLLMBackend({tiny_model_dir!r}, **kwargs)\n"
        "    except ValueError:\n"
        "        pass\n"
        "    else:\n"
        "        raise SystemExit(f'accepted {kwargs}')\n"
        "print('vllm' in sys.modules)\n"
    )
    assert fresh_python(code).strip() == "False"


@pytest.mark.parametrize(
    ("given", "folder", "expected"),
    [(None, None, "http"), (None, "/shared/sync", "filesystem"), ("filesystem", "/shared/sync", "filesystem")],
)
def test_one_rule_picks_the_weight_transfer(given, folder, expected):
    from trl_inference_ext.backends.vllm.weights import chosen_weight_transfer, make_weight_transfer

    assert chosen_weight_transfer(given, folder) == expected
    options = VLLMOptions(base_url="http://127.0.0.1:1", weight_transfer=given, weight_transfer_dir=folder)
    assert options.resolved_weight_transfer == expected
    assert make_weight_transfer(given, folder, 1 << 20).name == expected
