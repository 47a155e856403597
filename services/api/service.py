"""The API process's shell: a uvicorn server on the service's own (uv)loop, in front of one
`GatewayClient`. Endpoints reported on Ready: `http` ("http://HOST:PORT") and `metrics`.

    start: bind the listening socket (port 0: any) ─▶ uvicorn startup ─▶ Ready
    serve: uvicorn's main loop (one of the shell's loops)
    close: uvicorn shutdown (in-flight responses get GRACE_S) ─▶ the gateway client closes

uvicorn's own signal capture is turned off: SIGINT / SIGTERM belong to the service runner
(common/service_main.py), which stops the shell, which stops uvicorn.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Coroutine, Generator
from pathlib import Path
from typing import Any

import uvicorn

from common import security
from common.chat_template import ChatTemplate
from common.client import GatewayClient
from common.logging import get_logger
from common.service import ServiceShell
from common.tokenizer import Tokenizer
from services.api.app import ApiState, build_app
from services.api.config import ApiConfig
from services.api.core import Limits

log = get_logger(__name__)

GRACE_S = 2.0


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # the service runner owns the signals


class ApiService(ServiceShell):
    kind = "api"

    def __init__(self, cfg: ApiConfig, state: ApiState) -> None:
        super().__init__()
        self.cfg = cfg
        self.state = state
        self.app = build_app(state)
        host, port = cfg.host_port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError:
            self.sock.close()
            raise
        self.sock.listen(2048)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.host = host
        config = uvicorn.Config(
            self.app,
            loop="none",
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=int(GRACE_S),
            server_header=False,
        )
        self.server = _Server(config)
        self._started = False

    @property
    def endpoints(self) -> dict[str, str]:
        host = f"[{self.host}]" if ":" in self.host else self.host
        base = f"http://{host}:{self.port}"
        return {"http": base, "metrics": f"{base}/metrics"}

    async def start(self) -> None:
        self.server.config.load()
        self.server.lifespan = self.server.config.lifespan_class(self.server.config)
        await self.server.startup(sockets=[self.sock])
        self._started = True

    def loops(self) -> list[Coroutine[Any, Any, None]]:
        return [self._serve_http()]

    async def _serve_http(self) -> None:
        await self.server.main_loop()

    async def closing(self) -> None:
        if self._started:
            self._started = False
            self.server.should_exit = True
            await self.server.shutdown(sockets=[self.sock])

    def close_sockets(self) -> None:
        self.sock.close()
        self.state.client.close()


def load_template(cfg: ApiConfig, folder: Path) -> ChatTemplate | None:
    """`cfg.chat_template` (a file, or the template's text), else the model's own."""
    if cfg.chat_template:
        path = Path(cfg.chat_template)
        if "{" not in cfg.chat_template and path.is_file():
            return ChatTemplate(path.read_text())
        if "{" not in cfg.chat_template:
            raise ValueError(f"api.chat_template: no such file {cfg.chat_template!r}")
        return ChatTemplate(cfg.chat_template)
    return ChatTemplate.from_folder(folder)


def build(cfg: ApiConfig) -> ApiService:
    """An API server for `cfg`: the tokenizer, context, vocabulary and chat template of
    `cfg.model`; one client of `cfg.gateway`."""
    from common.model.config import ModelConfig
    from common.model.presets import resolve_model

    folder = Path(resolve_model(cfg.model))
    model = ModelConfig.from_folder(folder)
    context = model.max_position_embeddings
    template = load_template(cfg, folder)
    client_key = (
        security.read_key_file(cfg.gateway_client_key_file) if cfg.gateway_client_key_file else None
    )
    client = GatewayClient(
        cfg.gateway,
        timeout_s=cfg.request_timeout_s,
        server_key=cfg.gateway_server_key or None,
        client_key=client_key,
        retries=cfg.gateway_retries,
    )
    limits = Limits(
        model_name=cfg.model_name,
        max_model_len=context,
        vocab_size=model.vocab_size,
        max_tokens=min(cfg.max_tokens or context, context),
        default_max_tokens=min(cfg.default_max_tokens, context),
    )
    state = ApiState(
        client=client,
        tokenizer=Tokenizer.from_folder(folder),
        limits=limits,
        template=template,
        api_key=cfg.api_key,
        max_body_bytes=cfg.max_body_bytes,
    )
    try:
        return ApiService(cfg, state)
    except BaseException:
        client.close()
        raise
