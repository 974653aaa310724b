"""HTTP client for a vLLM OpenAI-compatible server (`vllm serve MODEL --logprobs-mode processed_logprobs`).

Requests go through `urllib` (no extra dependency) with token ids in and out (`return_token_ids`,
`return_tokens_as_token_ids`), so results line up with the other backends token for token. Connection errors and
502/503/504 answers are retried with exponential backoff; other HTTP errors raise `VLLMServerError`, with the API key
redacted from the message.

`CompletionRequests` turns generation and scoring into `/v1/completions` bodies and reads the answers back; how the
bodies reach a server is its subclass's `complete`: one server here (`VLLMServerClient`), several in
`pool.ServerPool`. `VLLMServerClient` also drives the routes a weight push needs (`/pause`, `/collective_rpc`,
...; see `weights.push`).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPException
from typing import Any

import torch

from ...errors import (
    InvalidValueError,
    OperationError,
    ServerConnectionError,
    ServerTimeoutError,
    VLLMServerError,
    VLLMServerUnusableError,
)
from ...types import SamplingConfig
from .sampling import Completion, finish_reason, merged_engine_options, sampler_settings

_RETRY_STATUSES = (502, 503, 504)
_ERROR_BODY_CHARS = 500


# ------------------------------------------------------------------------------------------------ payloads
def completion_payload(
    prompt: list[int], n: int, sampling: SamplingConfig, seed: int | None, *, logprob_token: int | None = None
) -> dict[str, Any]:
    """Body of a `/v1/completions` request that samples from `prompt` (the model id is added when sending).

    Args:
        prompt (`list[int]`): Prompt token ids.
        n (`int`): Completions to sample.
        sampling (`SamplingConfig`): Sampling settings (validated by the caller); its `engine_options` are added to
            the body as they are.
        seed (`int`, *optional*): Request seed.
        logprob_token (`int`, *optional*): Ask for the log-prob of this token at the first sampled position
            instead of the sampled tokens' log-probs.

    Returns:
        `dict`: The JSON body.
    """
    payload: dict[str, Any] = {
        "prompt": list(prompt),
        "n": n,
        "max_tokens": sampling.max_new_tokens,
        # All five sampler settings are sent, and neutral penalties besides, so a server default from
        # `generation_config.json` cannot change the distribution behind the reported log-probs.
        **sampler_settings(sampling),
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "return_token_ids": True,
        "return_tokens_as_token_ids": True,
    }
    payload = merged_engine_options(payload, sampling)
    if seed is not None:
        payload["seed"] = seed
    if sampling.stop:
        payload["stop"] = list(sampling.stop)
    if logprob_token is not None:
        payload["logprobs"] = 1
        payload["logprob_token_ids"] = [logprob_token]
    elif sampling.return_logprobs:
        payload["logprobs"] = 0
    return payload


def prompt_logprobs_payload(ids: list[int]) -> dict[str, Any]:
    """Body of a request for the raw log-probs of `ids`: prompt log-probs over `ids[:-1]`, plus `ids[-1]` generated.

    Leaving the last token out of the prompt keeps a sequence of exactly `max_model_len` tokens scorable (vLLM
    needs room for one output token).

    Args:
        ids (`list[int]`): The whole sequence (prompt + response).

    Returns:
        `dict`: The JSON body.
    """
    return {
        "prompt": ids[:-1],
        "max_tokens": 1,
        "temperature": 0.0,
        "prompt_logprobs": 0,
        "logprobs": 1,
        "logprob_token_ids": [ids[-1]],
        "return_tokens_as_token_ids": True,
    }


# ----------------------------------------------------------------------------------------------- responses
def parse_choices(choices: list[dict[str, Any]], with_logprobs: bool) -> list[Completion]:
    """The completions of one `/v1/completions` answer, in `index` order.

    Args:
        choices (`list[dict]`): The answer's `choices`.
        with_logprobs (`bool`): Whether sampled-token log-probs were requested.

    Returns:
        `list[tuple]`: `(token ids, finish_reason, log-probs or None)` per completion.

    Raises:
        RuntimeError: If the server returned a log-prob count that does not match the token count.
    """
    seqs: list[Completion] = []
    for choice in sorted(choices, key=lambda c: c["index"]):
        ids = [int(t) for t in choice.get("token_ids") or []]
        logprobs = None
        if with_logprobs:
            values = (choice.get("logprobs") or {}).get("token_logprobs") or []
            if len(values) != len(ids):
                raise OperationError(f"The server returned {len(values)} log-probs for {len(ids)} tokens.")
            logprobs = torch.tensor([float(v) for v in values], dtype=torch.float32)
        seqs.append((ids, finish_reason(choice.get("finish_reason")), logprobs))
    return seqs


def parse_prompt_logprobs(entries: list[dict[str, Any] | None], ids: list[int]) -> list[float]:
    """Log-probs of `ids[1:]` from a `prompt_logprobs` answer (the first token has none).

    Args:
        entries (`list[dict]`): The choice's `prompt_logprobs`, one entry per prompt position.
        ids (`list[int]`): The prompt token ids.

    Returns:
        `list[float]`: `len(ids) - 1` log-probs.

    Raises:
        RuntimeError: If a position has no log-prob for its token.
    """
    values = []
    for j in range(1, len(ids)):
        entry = entries[j] or {}
        item = entry.get(str(ids[j]))
        if item is None:
            raise OperationError(f"The server returned no prompt log-prob for token {ids[j]} at position {j}.")
        values.append(float(item["logprob"]))
    return values


def parse_token_logprob(choice: dict[str, Any], token: int) -> float:
    """Log-prob of `token` at the first sampled position, as asked for with `logprob_token_ids`.

    Args:
        choice (`dict`): One choice of a `/v1/completions` answer.
        token (`int`): The token asked about.

    Returns:
        `float`: Its log-prob.

    Raises:
        RuntimeError: If the answer does not contain it (e.g. the server is not vLLM).
    """
    top = ((choice.get("logprobs") or {}).get("top_logprobs") or [None])[0] or {}
    value = top.get(f"token_id:{token}")
    if value is None:
        raise OperationError(f"The server returned no log-prob for token {token}; is it a vLLM server?")
    return float(value)


# ------------------------------------------------------------------------------------------------- client
class CompletionRequests:
    """Generation and scoring as `/v1/completions` requests; subclasses say where the requests go (`complete`)."""

    def complete(self, payloads: list[dict[str, Any]], groups: list[int] | None = None) -> list[dict[str, Any]]:
        """Sends `/v1/completions` bodies (without the model id) and returns the JSON answers in input order.

        Args:
            payloads (`list[dict]`): Request bodies.
            groups (`list[int]`, *optional*): A group key per body; bodies of one group share a prefix and go to the
                same server when there are several.
        """
        raise NotImplementedError

    def generate(
        self,
        prompts: list[list[int]],
        n: int,
        seeds: list[int | None],
        sampling: SamplingConfig,
        groups: list[int] | None = None,
    ) -> list[list[Completion]]:
        """Samples `n` completions per prompt, one request per prompt.

        Args:
            prompts (`list[list[int]]`): Prompt token ids, one request each.
            n (`int`): Completions per request.
            seeds (`list[int | None]`): Seed of each request.
            sampling (`SamplingConfig`): Sampling settings (validated by the caller).
            groups (`list[int]`, *optional*): Group key of each request (default: one group per request).

        Returns:
            `list[list[tuple]]`: Per request, its completions as `(token ids, finish_reason, log-probs or None)`.
        """
        answers = self.complete([completion_payload(p, n, sampling, seed) for p, seed in zip(prompts, seeds)], groups)
        return [parse_choices(a["choices"], sampling.return_logprobs) for a in answers]

    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Raw log-probs (temperature 1, no truncation) of each token after the first, one request per sequence.

        Args:
            sequences (`list[list[int]]`): Token ids, at least two per sequence.

        Returns:
            `list[list[float]]`: `len(ids) - 1` log-probs per sequence; entry `j` predicts token `j + 1`.
        """
        answers = self.complete([prompt_logprobs_payload(ids) for ids in sequences])
        values = []
        for answer, ids in zip(answers, sequences):
            choice = answer["choices"][0]
            last = parse_token_logprob(choice, ids[-1])
            values.append([*parse_prompt_logprobs(choice["prompt_logprobs"], ids[:-1]), last])
        return values

    def next_token_logprobs(
        self, prefixes: list[list[int]], targets: list[int], sampling: SamplingConfig, groups: list[int] | None = None
    ) -> list[float]:
        """Log-prob of each target token right after its prefix, under the processed sampling distribution.

        Args:
            prefixes (`list[list[int]]`): Token ids before each target.
            targets (`list[int]`): The token scored after each prefix.
            sampling (`SamplingConfig`): Temperature, top-k and top-p to process the distribution with.
            groups (`list[int]`, *optional*): Group key of each request, e.g. the sequence it scores (its prefixes
                then share a server's prefix cache).

        Returns:
            `list[float]`: One log-prob per target.
        """
        payloads = [completion_payload(p, 1, sampling, None, logprob_token=t) for p, t in zip(prefixes, targets)]
        answers = self.complete(payloads, groups)
        return [parse_token_logprob(a["choices"][0], t) for a, t in zip(answers, targets)]


class VLLMServerClient(CompletionRequests):
    """Generates and scores token ids through a running vLLM server's `/v1/completions`.

    Args:
        base_url (`str`): URL of the server, e.g. `"http://127.0.0.1:8000"`.
        model_name (`str`): The model id to request; when the server serves a single model, that one is used.
        api_key (`str`, *optional*): Bearer token (`vllm serve --api-key`); never shown in error messages.
        timeout (`float`, *optional*, defaults to 600.0): Seconds to wait for one HTTP response.
        max_retries (`int`, *optional*, defaults to 3): Retries on connection errors and 502/503/504.

    Attributes:
        adapter (`str`, *optional*): Name of the LoRA adapter requests are sent to (set by a LoRA push); `None`
            requests the base model.
        unusable (`str`, *optional*): Why the server is out of service (a failed weight push); requests raise
            `VLLMServerUnusableError` until a push succeeds.
    """

    retry_backoff: float = 0.5
    """Seconds before the first retry; doubles on each further retry."""
    max_concurrent_requests: int = 32
    """Concurrent HTTP requests (the server batches them)."""

    def __init__(
        self,
        base_url: str,
        model_name: str,
        *,
        api_key: str | None = None,
        timeout: float = 600.0,
        max_retries: int = 3,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model_name = model_name
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.adapter: str | None = None
        self.unusable: str | None = None
        self._api_key = api_key
        self._served_model: str | None = None
        self._max_model_len: int | None = None

    # ----------------------------------------------------------------------------------------- model info
    def served_model(self) -> str:
        """The model id to put in requests, read once from `/v1/models` (with the server's `max_model_len`).

        Raises:
            ValueError: If the server serves several models and none is `model_name`.
        """
        if self._served_model is None:
            models = self.request("GET", "/v1/models").get("data", [])
            models = [m for m in models if not m.get("parent")]  # LoRA adapters are listed with their base model
            ids = [m.get("id") for m in models]
            chosen = next((m for m in models if m.get("id") == self.model_name), None)
            if chosen is None and len(models) == 1:
                chosen = models[0]
            if chosen is None:
                raise InvalidValueError(
                    f"The server at {self.base_url} serves {ids}; none is {self.model_name!r}. Pass the served "
                    f"model id as `model_name`."
                )
            self._served_model = str(chosen["id"])
            max_len = chosen.get("max_model_len")
            self._max_model_len = int(max_len) if isinstance(max_len, int) else None
        return self._served_model

    def max_model_len(self) -> int | None:
        """The served model's `max_model_len` as reported by `/v1/models`, or `None` if the server does not say."""
        self.served_model()
        return self._max_model_len

    # ------------------------------------------------------------------------------------------- requests
    def complete(self, payloads: list[dict[str, Any]], groups: list[int] | None = None) -> list[dict[str, Any]]:
        """POSTs `/v1/completions` requests concurrently (the server batches them); `groups` is not needed here.

        Args:
            payloads (`list[dict]`): Request bodies without the model id.
            groups (`list[int]`, *optional*): Ignored (one server).

        Returns:
            `list[dict]`: The JSON answers, in input order.

        Raises:
            VLLMServerUnusableError: If a weight push to this server failed and none succeeded since.
        """
        self.check_usable()
        model = self.adapter or self.served_model()
        bodies = [{"model": model, **p} for p in payloads]
        if len(bodies) == 1:
            return [self.request("POST", "/v1/completions", bodies[0])]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrent_requests, len(bodies))) as pool:
            return list(pool.map(lambda b: self.request("POST", "/v1/completions", b), bodies))

    def check_usable(self) -> None:
        """Raises `VLLMServerUnusableError` if the server is out of service (see `unusable`)."""
        if self.unusable is not None:
            raise VLLMServerUnusableError(self.unusable)

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        params: dict[str, str] | None = None,
        timeout: float | None = None,
        max_retries: int | None = None,
    ) -> dict[str, Any]:
        """One HTTP request with bounded retries on connection errors and 502/503/504.

        Args:
            method (`str`): `"GET"` or `"POST"`.
            path (`str`): Path under `base_url`, e.g. `"/v1/models"`.
            body (`dict`, *optional*): JSON body.
            params (`dict[str, str]`, *optional*): Query parameters.
            timeout (`float`, *optional*): Seconds to wait for the answer (default: `self.timeout`).
            max_retries (`int`, *optional*): Retries (default: `self.max_retries`).

        Returns:
            `dict`: The decoded JSON answer (`{}` for an empty one, `{"text": ...}` for a text answer).

        Raises:
            ConnectionError: If the server cannot be reached after `max_retries` retries.
            TimeoutError: If the server does not answer within `timeout` seconds (not retried: the work may be
                running).
            VLLMServerError: On any other HTTP error status, with the status and the start of the response body.
        """
        url = f"{self.base_url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        wait = self.timeout if timeout is None else float(timeout)
        retries = self.max_retries if max_retries is None else max_retries
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        last_error = ""
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(self.retry_backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(url, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=wait) as response:
                    raw = response.read().decode("utf-8")
                    if not raw.strip():
                        return {}
                    if "json" not in (response.headers.get("Content-Type") or ""):
                        return {"text": raw}  # e.g. `/v1/load_lora_adapter` answers in plain text
                    return json.loads(raw)
            except urllib.error.HTTPError as err:
                text = self._redact(err.read().decode("utf-8", errors="replace"))[:_ERROR_BODY_CHARS]
                if err.code in _RETRY_STATUSES:
                    last_error = f"HTTP {err.code}: {text}"
                    continue
                raise VLLMServerError(
                    f"vLLM server {method} {self.base_url}{path} failed with HTTP {err.code}: {text}", err.code, text
                ) from None
            except TimeoutError as err:
                raise ServerTimeoutError(f"vLLM server {method} {url} did not answer within {wait:g} s.") from err
            except urllib.error.URLError as err:
                if isinstance(err.reason, TimeoutError):
                    raise ServerTimeoutError(f"vLLM server {method} {url} did not answer within {wait:g} s.") from err
                last_error = f"{type(err.reason).__name__}: {err.reason}"
            except (ConnectionError, HTTPException) as err:
                last_error = f"{type(err).__name__}: {err}"
        raise ServerConnectionError(
            f"Could not reach the vLLM server at {self.base_url} after {retries + 1} attempt(s): {last_error}"
        )

    # -------------------------------------------------------------------------------- server management
    def is_healthy(self, timeout: float = 5.0) -> bool:
        """Whether `/health` answers 200 within `timeout` seconds (one attempt, no retries)."""
        try:
            self.request("GET", "/health", timeout=timeout, max_retries=0)
        except (ConnectionError, TimeoutError, VLLMServerError, ValueError):
            return False
        return True

    def collective_rpc(self, method: str, *args: str, timeout: float | None = None) -> list[Any]:
        """Calls a worker method on every worker of the server (`/collective_rpc`, `VLLM_SERVER_DEV_MODE=1`).

        Args:
            method (`str`): The worker method, e.g. `"reload_weights"` or a `trl_` method of
                `server.worker.WeightSyncExtension`.
            *args (`str`): Its arguments (the route passes strings only).
            timeout (`float`, *optional*): Seconds for the call (default: `self.timeout`).

        Returns:
            `list`: One result per worker.
        """
        body: dict[str, Any] = {"method": method, "args": list(args)}
        answer = self.request("POST", "/collective_rpc", body, timeout=timeout, max_retries=0)
        return list(answer.get("results") or [])

    def reload_weights_from(self, folder: str, timeout: float | None = None) -> None:
        """Has the server reload (some of) its weights from safetensors files in `folder`, a path on its machine."""
        body = {"method": "reload_weights", "kwargs": {"weights_path": folder}}
        self.request("POST", "/collective_rpc", body, timeout=timeout, max_retries=0)

    def pause(self) -> None:
        """Pauses scheduling; in-flight requests are kept and continue on `resume` (`/pause?mode=keep`)."""
        self.request("POST", "/pause", params={"mode": "keep"}, max_retries=0)

    def resume(self) -> None:
        """Resumes scheduling after `pause`."""
        self.request("POST", "/resume", max_retries=0)

    def reset_prefix_cache(self) -> None:
        """Drops the prefix cache, preempting kept requests so their KV entries are recomputed with the new weights.

        Raises:
            RuntimeError: If the server reports that the cache could not be reset.
        """
        answer = self.request("POST", "/reset_prefix_cache", params={"reset_running_requests": "true"}, max_retries=0)
        if answer.get("success") is False:
            raise OperationError(f"The vLLM server at {self.base_url} could not reset its prefix cache.")

    def weight_version(self) -> str | None:
        """The weight version the server reports (`/weight_info`); `"default"` until a push set one."""
        value = self.request("GET", "/weight_info", max_retries=0).get("weight_version")
        return None if value is None else str(value)

    def set_weight_version(self, version: str) -> None:
        """Records `version` as the server's weight version (`/update_weight_version`)."""
        self.request("POST", "/update_weight_version", {"new_version": version}, max_retries=0)

    def weight_checksums(self) -> dict[str, str]:
        """SHA-256 of every weight the server holds, by vLLM parameter name (`/weight_checker`)."""
        return dict(self.request("POST", "/weight_checker", {"action": "checksum"}).get("checksums") or {})

    def load_lora_adapter(self, name: str, folder: str) -> None:
        """Serves the LoRA adapter in `folder` (a path on the server's machine) under `name`, replacing any adapter
        of that name.

        The adapter is registered again under a fresh id rather than with vLLM's `load_inplace=True`: an in-place
        registration makes the engine reload the adapter from disk at every step that uses it, and a fresh id also
        keeps prefix-cache entries of the previous adapter from being reused. Needs a server started with
        `--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=1` (`trl-inference serve --lora-rank R`).
        """
        try:
            self.request("POST", "/v1/unload_lora_adapter", {"lora_name": name}, max_retries=0)
        except VLLMServerError as exc:
            if exc.status != 404:  # 404: not loaded yet
                raise
        self.request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": folder}, max_retries=0)

    def _redact(self, text: str) -> str:
        """`text` with the API key replaced by `***`."""
        return text.replace(self._api_key, "***") if self._api_key else text

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r}, model={self.model_name!r})"
