"""The public surface survives the package's reshaping: names, module paths, dotted paths handed to vLLM servers, and
one error family whose classes are also the builtins they refine."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import trl_inference_ext
from trl_inference_ext import errors

# What the 0.1.0 layout exported, module by module: each must still import from the same place.
NAMES_OF_0_1_0 = {
    "trl_inference_ext": [
        "GenerationResult",
        "InferenceModule",
        "ReferenceScorer",
        "SamplingConfig",
        "ToolCall",
        "create_inference_module",
    ],
    "trl_inference_ext.trl": [
        "InferenceSyncCallback",
        "RolloutFunction",
        "RolloutRecorder",
        "RolloutStep",
        "VLLMWeightTransfer",
        "rollout_func",
        "sampling_from_trl_args",
        "tool_call_reward",
        "tool_success_reward",
    ],
    "trl_inference_ext.backends": [
        "BACKEND_NAMES",
        "Backend",
        "ScoringConfig",
        "SequenceOutput",
        "backend_option_names",
        "create_backend",
    ],
    "trl_inference_ext.backends.vllm": [
        "INSTALL_HINT",
        "MAX_TEMPERATURE",
        "MIN_TEMPERATURE",
        "WEIGHT_TRANSFERS",
        "NoServerLeftError",
        "VLLMBackend",
        "VLLMEngineStartError",
        "VLLMServerError",
        "VLLMServerUnusableError",
        "WeightPushError",
        "checkpoint_name",
        "default_cpu_kv_cache_bytes",
        "engine_memory_settings",
        "is_vllm_usable",
    ],
    "trl_inference_ext.tools.parsers": [
        "AUTO_ORDER",
        "FORMATS",
        "MAX_CALLS",
        "MAX_INPUT_CHARS",
        "PARSER_CLASSES",
        "PARSER_NAMES",
        "AutoParser",
        "Call",
        "ToolFormat",
        "ToolParser",
        "detect_parser_from_template",
        "get_format",
        "get_parser",
    ],
}


@pytest.mark.parametrize("module", sorted(NAMES_OF_0_1_0))
def test_names_of_the_previous_layout_still_import(module):
    imported = importlib.import_module(module)
    missing = [name for name in NAMES_OF_0_1_0[module] if not hasattr(imported, name)]
    assert not missing, f"{module} lost {missing}"


def test_every_module_of_the_package_imports():
    failures = {}
    for info in pkgutil.walk_packages(trl_inference_ext.__path__, "trl_inference_ext."):
        try:
            importlib.import_module(info.name)
        except Exception as exc:  # report every module that fails, not just the first
            failures[info.name] = f"{type(exc).__name__}: {exc}"
    assert not failures


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (
            "trl_inference_ext.backends.vllm_worker.WeightSyncExtension",
            "trl_inference_ext.backends.vllm.server.worker.WeightSyncExtension",
        ),
        (
            "trl_inference_ext.serve_auth.APIKeyMiddleware",
            "trl_inference_ext.backends.vllm.server.auth.APIKeyMiddleware",
        ),
    ],
)
def test_dotted_paths_of_servers_started_by_an_older_release_resolve(old, new):
    """vLLM imports these paths by name (`--worker-extension-cls`, `--middleware`); a server started with the old
    path by an older release's launcher must find the same class."""

    def resolve(path: str) -> object:
        module, name = path.rsplit(".", 1)
        return getattr(importlib.import_module(module), name)

    assert resolve(old) is resolve(new)


def test_the_launcher_hands_vllm_the_new_dotted_paths():
    from trl_inference_ext.backends.vllm.server import launcher, worker

    assert worker.WORKER_EXTENSION == "trl_inference_ext.backends.vllm.server.worker.WeightSyncExtension"
    assert launcher.MIDDLEWARE == "trl_inference_ext.backends.vllm.server.auth.APIKeyMiddleware"


def test_the_server_side_modules_stay_light(fresh_python):
    """The worker extension and the middleware run inside vLLM's processes: importing them loads neither
    transformers nor the rest of this package."""
    code = (
        "import sys; import trl_inference_ext.backends.vllm.server.worker, trl_inference_ext.backends.vllm.server.auth;"
        "heavy = [m for m in ('transformers', 'trl_inference_ext.module', 'trl_inference_ext.backends.vllm.backend',"
        " 'trl_inference_ext.backends.hf.backend') if m in sys.modules]; print(heavy)"
    )
    assert fresh_python(code).strip() == "[]"


ERROR_CLASSES = [
    obj
    for _, obj in inspect.getmembers(errors, inspect.isclass)
    if issubclass(obj, Exception) and obj.__module__ == errors.__name__
]


def test_the_error_family_is_exported_at_top_level():
    assert errors.TrlInferenceError in ERROR_CLASSES and len(ERROR_CLASSES) > 1
    for cls in ERROR_CLASSES:
        assert getattr(trl_inference_ext, cls.__name__) is cls
        assert cls.__name__ in trl_inference_ext.__all__
        assert issubclass(cls, errors.TrlInferenceError)


@pytest.mark.parametrize(
    "cls", [c for c in ERROR_CLASSES if c is not errors.TrlInferenceError], ids=lambda c: c.__name__
)
def test_each_error_also_is_the_builtin_it_refines(cls):
    builtins = [b for b in cls.__mro__ if b.__module__ == "builtins" and b not in (Exception, BaseException, object)]
    assert builtins, f"{cls.__name__} refines no builtin error"


def test_bad_arguments_raise_errors_of_the_family_that_old_handlers_still_catch(tiny_model_dir):
    from trl_inference_ext import InferenceModule

    with pytest.raises(ValueError, match="devcie") as info:
        InferenceModule(tiny_model_dir, devcie="cpu")
    assert isinstance(info.value, errors.TrlInferenceError)
    with pytest.raises(FileNotFoundError) as missing:
        InferenceModule(tiny_model_dir + "-missing")
    assert isinstance(missing.value, errors.ModelNotFoundError)


def test_server_error_keeps_status_and_body_through_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(errors.VLLMServerError("bad request", 400, "body")))
    assert (str(err), err.status, err.body) == ("bad request", 400, "body")
