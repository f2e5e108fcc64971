"""Predictions from the newest model a device holds, and the loopback endpoint that serves them.

A new version is built into a whole module off the event loop and then swapped in by
one reference assignment, so ``predict`` never sees a half-loaded model and answers
while the device trains. The endpoint binds 127.0.0.1 only and bounds every request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import InferenceSettings
from ..errors import EdgeflError
from ..params import load_into

log = logging.getLogger(__name__)

#: The largest request body the endpoint reads; larger ones are refused unread.
MAX_BODY_BYTES = 4 * 2**20
#: A client that sends nothing for this long loses its connection.
REQUEST_TIMEOUT_S = 5.0


class NoModel(EdgeflError):
    """No model to predict with yet, or a task that cannot build one."""


class BadInput(EdgeflError, ValueError):
    """Inputs that do not fit the model: shape, size or non-finite values."""


@dataclass(frozen=True)
class Prediction:
    """The model's outputs for each input row, and the version that produced them."""

    version: int
    outputs: np.ndarray

    @property
    def labels(self) -> np.ndarray:
        """The class of each row (argmax of its outputs)."""
        return self.outputs.argmax(axis=1)


@dataclass(frozen=True)
class _Served:
    version: int
    module: nn.Module


class Inference:
    """The model being served; ``offer`` a newer version, ``run`` swaps it in.

    ``build`` makes an empty module of the task's model (the task's ``build_model``);
    without it ``predict`` raises ``NoModel``. ``features`` is the shape of one input row.
    """

    def __init__(
        self,
        build: Callable[[], nn.Module] | None,
        features: tuple[int, ...],
        settings: InferenceSettings,
    ) -> None:
        self._build = build
        self.features = features
        self.int8 = settings.int8
        self.max_batch = settings.max_batch
        self._served: _Served | None = None
        self._offered: tuple[int, Mapping[str, np.ndarray]] | None = None
        self._due = asyncio.Event()
        self.swaps = 0
        self.failed = 0  # offered versions that did not load

    @property
    def version(self) -> int | None:
        served = self._served
        return None if served is None else served.version

    def wants(self, version: int) -> bool:
        """Whether ``version`` is newer than what is served or waiting to be."""
        newest = self._offered[0] if self._offered is not None else self.version
        return self._build is not None and (newest is None or version > newest)

    def offer(self, version: int, params: Mapping[str, np.ndarray]) -> None:
        """A newer model to serve; the owner's ``run`` builds it and swaps it in."""
        if self.wants(version):
            self._offered = (version, params)
            self._due.set()

    async def run(self) -> None:
        """Swap in every offered version, building each in a worker thread; one that does
        not load leaves the served version as it is."""
        while True:
            await self._due.wait()
            self._due.clear()
            offered, self._offered = self._offered, None
            if offered is None:
                continue
            try:
                await asyncio.to_thread(self.load, *offered)
            except (KeyError, RuntimeError, ValueError) as exc:  # torch refused it
                self.failed += 1
                log.error(
                    "predictions stay on v%s: v%d did not load: %s", self.version, offered[0], exc
                )

    def load(self, version: int, params: Mapping[str, np.ndarray]) -> None:
        """Build ``version`` whole, then make it the served one in one assignment."""
        if self._build is None:
            raise NoModel("the task has no build_model(): nothing to predict with")
        module = self._build()
        load_into(module, params)
        module.eval()
        if self.int8:
            with warnings.catch_warnings():  # recent torch deprecates torch.ao.quantization
                warnings.simplefilter("ignore")
                module = torch.ao.quantization.quantize_dynamic(
                    module, {nn.Linear}, dtype=torch.qint8
                )
        self._served = _Served(version, module)
        self.swaps += 1
        log.debug("serving predictions from v%d%s", version, " (int8)" if self.int8 else "")

    def predict(self, x: Any) -> Prediction:
        """Outputs of the newest complete model for ``x``: one row, or a batch of rows."""
        served = self._served  # one read: the whole call uses this version
        if served is None:
            raise NoModel("no model received yet")
        batch = self.rows(x)
        with torch.inference_mode():
            out = served.module(batch)
        return Prediction(served.version, out.float().numpy())

    def rows(self, x: Any) -> torch.Tensor:
        """``x`` as a float32 batch of the model's rows, or ``BadInput``."""
        try:
            t = torch.as_tensor(np.asarray(x, dtype=np.float32))
        except (TypeError, ValueError) as exc:
            raise BadInput(f"inputs are not numbers: {exc}") from None
        if tuple(t.shape) == self.features:
            t = t.unsqueeze(0)
        if tuple(t.shape[1:]) != self.features or len(t) == 0:
            raise BadInput(f"expected rows of shape {self.features}, got {tuple(t.shape)}")
        if len(t) > self.max_batch:
            raise BadInput(f"{len(t)} rows; at most {self.max_batch} per call")
        if not bool(torch.isfinite(t).all()):
            raise BadInput("inputs must be finite")
        return t


# ------------------------------------------------------------ local endpoint


class Endpoint:
    """``POST /predict`` and ``GET /model`` on 127.0.0.1 in a thread of its own.

    ``start``/``stop`` are the owner's; a request's answer comes from ``Inference.predict``.
    Refused requests are counted by HTTP status in ``refused`` and logged once per status.
    """

    def __init__(self, inference: Inference, port: int) -> None:
        self.inference = inference
        self.refused: Counter[int] = Counter()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="edgefl-predict", daemon=True
        )
        self._thread.start()
        log.info("predictions served on http://127.0.0.1:%d/predict", self.port)

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()

    def answer(self, method: str, path: str, body: bytes | None) -> tuple[int, dict[str, Any]]:
        """The status and JSON document for one request."""
        if method == "GET" and path == "/model":
            return 200, {"version": self.inference.version, "int8": self.inference.int8}
        if method != "POST" or path != "/predict":
            return 404, {"error": "POST /predict or GET /model"}
        try:
            doc = json.loads(body or b"")
            x = doc["x"] if isinstance(doc, dict) else None
            if x is None:
                return 400, {"error": 'expected {"x": [row, ...]}'}
            got = self.inference.predict(x)
        except ValueError as exc:  # bad JSON or BadInput
            return 400, {"error": str(exc)[:200]}
        except NoModel as exc:
            return 503, {"error": str(exc)}
        return 200, {
            "version": got.version,
            "labels": got.labels.tolist(),
            "outputs": [[_finite(v) for v in row] for row in got.outputs.tolist()],
        }

    def refuse(self, status: int, why: str) -> None:
        if not self.refused[status]:
            log.warning("prediction request refused (%d): %s (logged once per status)", status, why)
        self.refused[status] += 1


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _handler(endpoint: Endpoint) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = REQUEST_TIMEOUT_S
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self._reply(*endpoint.answer("GET", self.path, None))

        def do_POST(self) -> None:
            length = self.headers.get("Content-Length", "")
            if not length.isdigit():
                self._reply(411, {"error": "Content-Length required"})
            elif int(length) > MAX_BODY_BYTES:
                self.close_connection = True  # the body stays unread
                self._reply(413, {"error": f"body over {MAX_BODY_BYTES} bytes"})
            else:
                body = self.rfile.read(int(length))
                self._reply(*endpoint.answer("POST", self.path, body))

        def _reply(self, status: int, doc: dict[str, Any]) -> None:
            if status >= 400:
                endpoint.refuse(status, str(doc.get("error", "")))
            payload = json.dumps(doc).encode()
            self.send_response(status, HTTPStatus(status).phrase)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("predict endpoint: " + format, *args)

    return Handler
