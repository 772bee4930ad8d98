"""Run the app under uvicorn: bind, load the engine in the background, shut down gracefully on SIGTERM.

Shutdown order on SIGTERM or Ctrl-C: stop accepting connections, let in-flight
requests finish for up to ``shutdown_timeout`` seconds, cancel the rest (their
engine requests are aborted and their KV blocks freed), shut the engine down,
exit 0. uvicorn by default re-raises the caught signal after its own shutdown,
which makes a clean SIGTERM exit look like a crash (status 143) to systemd and
Kubernetes; ``_Server`` keeps the exit status 0.
"""

from __future__ import annotations

import contextlib
import gc
import ipaddress
import json
import logging
import signal
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

from onecard.errors import BadInputError, OnecardError, require_extra
from onecard.serve.tool_parsers import PARSERS

log = logging.getLogger(__name__)

# The engine's step loop and the event loop share one GIL. Each time the step loop lets go of it (a torch call,
# the wake-up write to the event loop) the event loop may take it, and CPython's default 5 ms switch interval is
# then how long the step loop can wait to get it back: measured, ~2 ms lost per engine step at 100 streams.
# 0.5 ms bounds that wait; the extra forced switches happen only while both threads want the GIL.
GIL_SWITCH_INTERVAL_S = 0.0005


@dataclass
class ServeConfig:
    """What ``onecard serve`` was asked for; validated here so the CLI fails before loading anything.

    ``engine`` holds ``EngineConfig`` keyword arguments (the CLI passes the ones the user changed); they are checked
    by building an ``EngineConfig``, so a bad value or combination is the engine's own one-line error.
    """

    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    shutdown_timeout: float = 30.0
    log_level: str = "warning"
    rag_db: str | None = None
    engine: dict = field(default_factory=dict)
    tool_call_parser: str | None = None

    def __post_init__(self) -> None:
        from onecard.engine.config import EngineConfig

        if not 0 <= self.port <= 65535:
            raise BadInputError(f"--port {self.port} is not a TCP port; use 1-65535 (or 0 for any free port)")
        if self.shutdown_timeout <= 0:
            raise BadInputError(f"--shutdown-timeout {self.shutdown_timeout} must be > 0 seconds")
        if self.api_key is not None and not self.api_key.strip():
            raise BadInputError("--api-key is empty; pass a non-empty key or leave the option out")
        if self.rag_db is not None and "://" not in self.rag_db and not Path(self.rag_db).is_file():
            raise BadInputError(f"--rag-db {self.rag_db}: no such index file; build one with 'onecard rag index DOCS "
                                "--db FILE'")
        if self.tool_call_parser is not None and self.tool_call_parser not in PARSERS:
            raise BadInputError(f"--tool-call-parser {self.tool_call_parser}: choose one of {', '.join(PARSERS)}")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise BadInputError("--served-model-name is empty; pass a name or leave the option out")
        unknown = sorted(set(self.engine) - ({f.name for f in fields(EngineConfig)} - {"model"}))
        if unknown:
            raise BadInputError(f"engine={{{', '.join(map(repr, unknown))}: ...}}: not EngineConfig options; see "
                                "onecard.engine.config.EngineConfig for the names")
        EngineConfig(self.model, **self.engine)

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).name

    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


VISION_QUANTIZATION = (None, "rtn-int4")
# The EngineConfig options a LLaVA folder honours (onecard.vision builds its own one-sequence engine); any other
# option is refused rather than silently ignored.
VISION_OPTIONS = ("dtype", "device", "quantization", "max_model_len", "gpu_memory_utilization", "enforce_eager")


def is_vision_folder(model: str | Path) -> bool:
    """A folder whose config.json has a ``vision_config`` (LLaVA): served through ``onecard.vision`` for image chat."""
    try:
        config = json.loads((Path(model).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "vision_config" in config


def engine_factory(cfg: ServeConfig) -> Callable[[], object]:
    """A zero-argument builder of the engine for ``cfg`` (run by the app off the event loop): the AsyncEngine,
    or for a LLaVA folder a ``VisionEngine`` over ``VisionModel`` (language model in int4 with rtn-int4)."""

    def build():
        from onecard.engine import AsyncEngine

        return AsyncEngine(cfg.model, **cfg.engine)

    def build_vision():
        from onecard.serve.vision_engine import VisionEngine
        from onecard.vision import VisionConfig, VisionModel

        e = cfg.engine
        vc = VisionConfig(int4=e.get("quantization") == "rtn-int4",
                          **{k: e[k] for k in ("dtype", "device", "max_model_len", "gpu_memory_utilization",
                                                "enforce_eager") if k in e})
        return VisionEngine(VisionModel.from_pretrained(cfg.model, vc))

    if is_vision_folder(cfg.model):
        if cfg.engine.get("quantization") not in VISION_QUANTIZATION:
            raise BadInputError(f"--quantization {cfg.engine['quantization']}: a LLaVA folder is served with its "
                                "language model as stored (no option) or quantized on load (--quantization rtn-int4)")
        ignored = sorted(set(cfg.engine) - set(VISION_OPTIONS))
        if ignored:
            raise BadInputError(f"{', '.join(ignored)} not supported when serving a LLaVA folder (onecard.vision runs "
                                f"one sequence with its own cache); drop them, or serve a text model folder")
        return build_vision
    return build


def bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket ourselves so 'address in use' is a one-line error, not a uvicorn exit(1)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise BadInputError(f"cannot listen on {host}:{port} ({err.strerror}); pick another --port or --host") from None
    sock.set_inheritable(True)
    return sock


def _uvicorn_server_class():
    import uvicorn

    class _Server(uvicorn.Server):
        """uvicorn.Server that exits normally after a signal-initiated graceful shutdown (see module doc)."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return _Server


def serve(cfg: ServeConfig, factory: Callable[[], object] | None = None,
          on_listening: Callable[[str], None] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status (0 after a graceful shutdown)."""
    require_extra("fastapi", "serve")
    require_extra("uvicorn", "serve")
    require_extra("prometheus_client", "serve")
    import uvicorn

    from onecard.serve.app import build_app

    if factory is None:
        from onecard.models import open_model_folder
        from onecard.vision import open_llava_folder

        # A wrong path or an incomplete folder fails here, in one line, before the server starts.
        if is_vision_folder(cfg.model):
            open_llava_folder(cfg.model)
        else:
            open_model_folder(cfg.model)
        factory = engine_factory(cfg)
    if not cfg.is_loopback() and cfg.api_key is None:
        log.warning("listening on %s without --api-key: anyone who can reach this address can use the model", cfg.host)
    sock = bind(cfg.host, cfg.port)
    app = build_app(model_name=cfg.model_name, api_key=cfg.api_key, engine_factory=factory,
                    shutdown_timeout=cfg.shutdown_timeout, rag_db=cfg.rag_db, tool_call_parser=cfg.tool_call_parser)
    server = _uvicorn_server_class()(uvicorn.Config(
        app, log_level=cfg.log_level, timeout_graceful_shutdown=cfg.shutdown_timeout, lifespan="on",
        access_log=cfg.log_level in ("debug", "info")))

    def load_failed(err: Exception) -> None:
        server.should_exit = True

    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # this process is the server's: see GIL_SWITCH_INTERVAL_S

    def loaded() -> None:
        # The model, tokenizer and libraries are now millions of long-lived objects: freezing them keeps the
        # cyclic GC from re-scanning them (pauses in the token stream). Process-wide, hence here, not in the app.
        gc.collect()
        gc.freeze()

    app.state.on_load_error = load_failed
    app.state.on_loaded = loaded
    host, port = sock.getsockname()[:2]
    if on_listening is not None:
        on_listening(f"http://{host}:{port}")
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if app.state.load_error is not None:
        raise OnecardError(f"the engine failed to load {cfg.model}: {app.state.load_error}")
    return 0
