"""ASGI middleware that requires the API key on every route of a vLLM server, the weight-sync routes included.

vLLM's own `--api-key` guards only the `/v1` routes; with `VLLM_SERVER_DEV_MODE=1` the server also answers
`/collective_rpc`, `/pause`, `/update_weights`, `/weight_checker`, ... and any of them changes or reveals the served
weights. Pass this class to vLLM with `--middleware trl_inference_ext.backends.vllm.server.auth.APIKeyMiddleware` (the
`trl-inference serve` launcher does) and the key in the `VLLM_API_KEY` environment variable (not on the command line,
where other users of the machine can read it).

This module is imported by the vLLM server process: it needs nothing beyond the standard library.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ....errors import OperationError

API_KEY_ENV = "VLLM_API_KEY"
"""Environment variable holding the key (vLLM reads the same one for its `/v1` routes)."""
OPEN_PATHS = frozenset({"/health"})
"""Paths answered without the key: the liveness probe, whose empty answer reveals nothing."""

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class APIKeyMiddleware:
    """Refuses every HTTP and WebSocket request without `Authorization: Bearer <key>`, except `OPEN_PATHS`.

    Args:
        app (`ASGIApp`): The application to protect.
        api_key (`str`, *optional*): The key; read from `VLLM_API_KEY` when not given (vLLM builds middleware
            without arguments).

    Raises:
        RuntimeError: If no key is given or set: the server must not start unprotected by mistake.
    """

    def __init__(self, app: ASGIApp, api_key: str | None = None) -> None:
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV, "")
        if not key:
            raise OperationError(
                f"APIKeyMiddleware needs an API key: set the {API_KEY_ENV} environment variable (or start the server "
                "with `trl-inference serve`, which sets one)."
            )
        self.app = app
        self._digest = hashlib.sha256(key.encode("utf-8")).digest()

    def authorized(self, scope: Scope) -> bool:
        """Whether the request in `scope` carries the key (compared in constant time)."""
        for name, value in scope.get("headers") or ():
            if name.lower() == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                digest = hashlib.sha256(token.strip().encode("utf-8")).digest()
                return scheme.lower() == "bearer" and hmac.compare_digest(digest, self._digest)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind not in ("http", "websocket") or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", "")).removeprefix(str(scope.get("root_path", ""))) or "/"
        if path in OPEN_PATHS or self.authorized(scope):
            await self.app(scope, receive, send)
            return
        if kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"error": "Unauthorized: this server needs `Authorization: Bearer <api key>`."}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
