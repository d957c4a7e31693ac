"""`edge-memdec serve`: an OpenAI-compatible HTTP server over one `MemoryDecoderLM`, Python stdlib only.

Each request is read, checked and tokenized in its own HTTP thread, then waits in one FIFO queue for the one
decode loop: a single worker thread runs the queued `Generation`s, up to `--parallel` of them together in one
llama.cpp batch per step (batch.py; with 1, one after the other), and hands their text pieces back through a
per-request queue, so a slow client never holds the models. A client that disconnects (while queued or
mid-answer) has its generation cancelled and its sequence goes to the next request.

Like llama-server it serves one model under any name a client asks for, answers llama-server's /tokenize,
/detokenize, /props and /metrics, and with an API key wants `Authorization: Bearer KEY` on every request but
/health and the chat page (`/` and its files under /ui/, which hold no data; the page sends the key itself).
"""

from __future__ import annotations

import hmac
import json
import logging
import queue
import select
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from edge_memdec import defaults, llama_server_api, web
from edge_memdec.api import MemoryDecoderLM
from edge_memdec.batch import BatchDecoder
from edge_memdec.decode import Generation
from edge_memdec.errors import UserError
from edge_memdec.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from edge_memdec.metrics import Metrics
from edge_memdec.openai_api import CHAT, TEXT, Answer, ApiError, parse_request
from edge_memdec.pair import ModelPair

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20  # larger request bodies get 413
MAX_DRAIN_BYTES = 16 << 20  # an oversize body up to this size is read and dropped so the client sees the 413
MAX_QUEUED = 64  # requests waiting for the decode loop; more get 503
POLL_SECONDS = 0.2  # how often a waiting request checks that its client is still there
SOCKET_TIMEOUT = 60.0  # seconds a client may stall while sending its request or reading the answer


SHUTTING_DOWN = ApiError(503, "the server is shutting down", kind="server_error")
PUBLIC_PATHS = ("/health", "/")  # answered without the API key, as is everything under WEB_PREFIX
WEB_PREFIX = "/ui/"  # the chat page's files: /ui/app.js, /ui/style.css


class ClientGone(Exception):
    """The client closed the connection (its generation is then cancelled)."""


@dataclass
class Job:
    """One generation waiting for, or running in, the decode loop.

    `events` carries its output back to the HTTP thread: ("piece", text) while it runs, then ("done", None)
    or ("error", exception).
    """

    generation: Generation
    label: str  # names the request in the log
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    counted: bool = True  # whether its tokens go into the metrics (the warm-up's do not)


class DecodeWorker:
    """The decode loop's thread: runs queued generations in arrival order, `pair.n_parallel` at a time.

    With one sequence each generation runs alone through `Generation`'s own loop; with more, up to that many
    run together in a `BatchDecoder` (one llama.cpp batch per step), and a queued request starts as soon as a
    sequence is free.
    """

    def __init__(self, pair: ModelPair, max_queued: int = MAX_QUEUED, metrics: Metrics | None = None) -> None:
        self.pair = pair
        self.metrics = metrics or Metrics()
        self._jobs: queue.Queue[Job] = queue.Queue(max_queued)
        self._stopping = threading.Event()
        self._current: Job | None = None  # one at a time
        self._running: dict[Generation, Job] = {}  # batched
        run = self._run if pair.n_parallel == 1 else self._run_batched
        self._thread = threading.Thread(target=run, name="decode-loop", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return self._jobs.qsize()

    @property
    def running(self) -> int:
        return len(self._running) + int(self._current is not None)

    def submit(self, generation: Generation, label: str, counted: bool = True) -> Job:
        job = Job(generation, label, counted=counted)
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise ApiError(
                503, "the server is busy (too many queued requests); retry shortly", kind="server_error"
            ) from None
        return job

    def run(self, generation: Generation, label: str) -> None:
        """Run `generation` on the decode loop (after any queued requests) and wait for its end, uncounted in
        the metrics; its error, if any, is raised here."""
        job = self.submit(generation, label, counted=False)
        while (event := job.events.get())[0] == "piece":
            pass
        if event[0] == "error":
            raise event[1]

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                job = self._jobs.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue
            if self._stopping.is_set():
                job.events.put(("error", SHUTTING_DOWN))
                break
            self._current = job
            try:
                self._run_job(job)
            except Exception as err:  # a failed decode ends its own request, never the loop
                logger.exception("%s failed", job.label)
                job.events.put(("error", err))
            finally:
                self._current = None

    def _run_job(self, job: Job) -> None:
        generation = job.generation
        if generation.cancel.is_set():
            logger.info("%s: dropped, its client left while it waited", job.label)
            job.events.put(("done", None))
            return
        try:
            for piece in generation:
                job.events.put(("piece", piece))
        finally:
            if job.counted:
                self.metrics.count_generation(generation)
        job.events.put(("done", None))
        _log_done(job)

    def _run_batched(self) -> None:
        decoder = BatchDecoder(self.pair)
        while True:
            if self._stopping.is_set():
                for job in self._running.values():
                    job.generation.cancel.set()  # their next step ends them
                if not decoder.active:
                    break
            else:
                self._admit(decoder)
                if not decoder.active:
                    continue
            try:
                outputs = decoder.step()
            except Exception as err:  # a bug in the step: its generations end, never the loop
                logger.exception("a batched decoding step failed")
                outputs = decoder.abandon(err)
            for out in outputs:
                job = self._running[out.generation]
                for piece in out.pieces:
                    job.events.put(("piece", piece))
                if not out.done:
                    continue
                del self._running[out.generation]
                if job.counted:
                    self.metrics.count_generation(out.generation)
                if out.error is not None:
                    logger.error("%s failed", job.label, exc_info=out.error)
                    job.events.put(("error", out.error))
                else:
                    job.events.put(("done", None))
                    _log_done(job)

    def _admit(self, decoder: BatchDecoder) -> None:
        """Queued jobs into the free sequences; waits up to POLL_SECONDS for one when nothing runs."""
        while decoder.free:
            try:
                job = self._jobs.get_nowait() if decoder.active else self._jobs.get(timeout=POLL_SECONDS)
            except queue.Empty:
                return
            if self._stopping.is_set():
                job.events.put(("error", SHUTTING_DOWN))
                return
            if job.generation.cancel.is_set():
                logger.info("%s: dropped, its client left while it waited", job.label)
                job.events.put(("done", None))
                continue
            try:
                decoder.add(job.generation)
            except Exception as err:
                logger.exception("%s failed", job.label)
                job.events.put(("error", err))
                continue
            self._running[job.generation] = job

    def close(self) -> None:
        """Stop after cancelling the running generations; queued requests get an error."""
        self._stopping.set()
        current = self._current
        if current is not None:
            current.generation.cancel.set()
        self._thread.join()
        while not self._jobs.empty():
            self._jobs.get_nowait().events.put(("error", SHUTTING_DOWN))


def _log_done(job: Job) -> None:
    generation = job.generation
    logger.info(
        "%s: lambda %.2f, %d prompt tokens (%d cached) in %.2f s, %d tokens at %.1f tok/s, %s",
        job.label,
        generation.lam,
        len(generation.prompt_tokens),
        generation.n_cached,
        generation.prompt_seconds,
        len(generation.tokens),
        generation.tokens_per_second,
        generation.finish_reason,
    )


def default_model_id(lm: MemoryDecoderLM) -> str:
    """`base` or `base+memdec`, from the GGUF file names without their extension."""
    names = [model.path.stem for model in lm.pair.models]
    return "+".join(names)


class MemdecServer(ThreadingHTTPServer):
    """The HTTP server: `serve_forever()` to run, `close()` (from another thread) to stop and release the port."""

    daemon_threads = True
    # connections the kernel holds before the accept loop takes them (socketserver's default is 5: a burst of
    # clients on a busy machine then had connections reset); room for every request the queue may hold
    request_queue_size = 2 * MAX_QUEUED

    def __init__(
        self,
        lm: MemoryDecoderLM,
        host: str = defaults.SERVER_HOST,
        port: int = defaults.SERVER_PORT,
        model_id: str | None = None,
        max_tokens: int = defaults.SERVER_MAX_TOKENS,
        max_queued: int = MAX_QUEUED,
        api_key: str | None = None,
    ) -> None:
        if max_tokens < 1:
            raise UserError(f"the answer length cap must be at least 1 token, got {max_tokens}")
        if api_key is not None and not (api_key.strip() and api_key.isprintable() and api_key.isascii()):
            raise UserError("the API key must be printable ASCII text and not blank")
        self.lm = lm
        self.model_id = model_id or default_model_id(lm)
        self.max_tokens = max_tokens
        self.api_key = api_key
        self.metrics = Metrics()
        self.created = int(time.time())
        try:
            lm.chat_format  # noqa: B018  (built once here, not raced by the first chat requests)
        except UserError:
            pass  # a base without a chat template serves /v1/completions only; chat requests get a 400
        try:
            super().__init__((host, port), RequestHandler)
        except OSError as err:
            raise UserError(
                f"cannot listen on {host}:{port} ({err.strerror}); pick another --port or --host"
            ) from None
        self.worker = DecodeWorker(lm.pair, max_queued, self.metrics)
        self._serving = False

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.server_address[0]}:{self.port}/v1"

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._serving = True
        super().serve_forever(poll_interval)

    def warm_up(self) -> None:
        """One sampled token through the pair, so the first request does not wait for kernel compilation.

        It runs on the decode loop's thread, like every request: llama.cpp's OpenMP build gives each thread
        that decodes its own team of workers, and once the teams together hold more threads than there are
        cores, their workers stop spinning between graphs and sleep instead. Measured on 2 cores: a server
        whose main thread had decoded too streamed 80 tokens/s, against 122 for the same pair in one thread."""
        self.worker.run(self.lm.start(self.lm.tokenize("Hello"), max_tokens=1, seed=0), "warm-up")

    def close(self) -> None:
        """Stop serving, cancel the running generation, free the port (the models stay open: close `lm` after)."""
        if self._serving:
            self.shutdown()
        self.worker.close()
        self.server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that breaks between requests is routine; anything else is logged, and serving goes on."""
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            logger.info("%s: connection closed", client_address[0])
        else:
            logger.exception("request from %s failed", client_address[0])

    def models_list(self) -> dict[str, Any]:
        pair = self.lm.pair
        model = {
            "id": self.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "edge-memdec",
            "meta": {
                "base": pair.base.path.name,
                "memdec": pair.memdec.path.name if pair.memdec is not None else None,
                "lambda": round(self.lm.lam, 6),
                "memdecs": [{"name": name, "file": m.path.name, "lambda": round(lam, 6)}
                            for name, m, lam in zip(pair.names, pair.memdecs, pair.lams, strict=True)],
                "n_ctx": pair.n_ctx,
                "max_tokens": self.max_tokens,
            },
        }
        return {"object": "list", "data": [model]}

    def model_name(self, body: dict) -> str:
        """The model id an answer carries: the one the client asked for (any name is this pair, as with
        llama-server), else ours."""
        name = body.get("model")
        if name is None:
            return self.model_id
        if not isinstance(name, str):
            raise ApiError(400, f"'model' must be a string, got {name!r}", param="model")
        return name

    def authorised(self, header: str | None) -> None:
        """Nothing when no API key is set or `header` is `Bearer <the key>`; else a 401 in OpenAI's shape."""
        if self.api_key is None:
            return
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(
                401,
                "this server needs an API key: send the header 'Authorization: Bearer KEY'",
                code="invalid_api_key",
                kind="authentication_error",
            )
        if not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "the API key is not valid", code="invalid_api_key", kind="authentication_error")


class RequestHandler(BaseHTTPRequestHandler):
    """One HTTP connection (keep-alive): routes requests, answers errors in OpenAI's shape."""

    protocol_version = "HTTP/1.1"
    server_version = "edge-memdec"
    timeout = SOCKET_TIMEOUT
    server: MemdecServer

    ROUTES = {
        "/": {"GET": "page"},
        "/health": {"GET": "health"},
        "/v1/models": {"GET": "models"},
        "/v1/chat/completions": {"POST": "chat_completions"},
        "/v1/completions": {"POST": "completions"},
        "/tokenize": {"POST": "tokenize"},
        "/detokenize": {"POST": "detokenize"},
        "/props": {"GET": "props"},
        "/metrics": {"GET": "metrics"},
    }

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def log_message(self, format: str, *args: Any) -> None:
        logger.info("%s %s", self.address_string(), format % args)

    def send_response(self, code: int, message: str | None = None) -> None:
        self.server.metrics.count_request(getattr(self, "_route", "other"), code)
        super().send_response(code, message)

    # ---- routing and errors ----

    def _dispatch(self, method: str) -> None:
        self._started = False
        self._next_check = 0.0
        self._allow: list[str] = []
        path = urlsplit(self.path).path.rstrip("/") or "/"
        self._route = path
        if path.startswith("/v1/models/"):
            self._route = "/v1/models/{id}"
        elif path.startswith(WEB_PREFIX):
            self._route = WEB_PREFIX + "{file}"
        try:
            if path not in PUBLIC_PATHS and not path.startswith(WEB_PREFIX):
                self.server.authorised(self.headers.get("Authorization"))
            if path.startswith("/v1/models/"):
                methods = {"GET": "model"}
            elif path.startswith(WEB_PREFIX):
                methods = {"GET": "web_file"}
            else:
                methods = self.ROUTES.get(path)
            if methods is None:
                self._route = "other"
                raise ApiError(
                    404, f"there is no {path}; the server answers {', '.join(self.ROUTES)}", code="not_found"
                )
            if method not in methods:
                self._allow = list(methods)
                raise ApiError(
                    405, f"{path} takes {' or '.join(methods)}, not {method}", code="method_not_allowed"
                )
            getattr(self, "handle_" + methods[method])(path)
        except (ClientGone, BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except ApiError as err:
            self._send_error(err)
        except UserError as err:
            self._send_error(ApiError(400, str(err)))
        except Exception:
            logger.exception("request failed: %s %s", method, path)
            self._send_error(
                ApiError(500, "internal server error; see the server's log", kind="server_error")
            )

    def _send_error(self, err: ApiError) -> None:
        if self._started:  # mid-stream: tell the client in the stream, then end it
            self._send_event(err.body())
            self._end_stream()
            return
        self._send_json(err.status, err.body())

    def _send_json(self, status: int, obj: dict[str, Any]) -> None:
        self._send_bytes(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"), "application/json")

    def _send_bytes(
        self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        self.send_header("Content-Length", str(len(data)))
        if self._allow:
            self.send_header("Allow", ", ".join(self._allow))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    # ---- request body ----

    def _read_json(self) -> dict[str, Any]:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise ApiError(411, "send the request body with a Content-Length header, not chunked")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            raise ApiError(
                411, "the request needs a Content-Length header with the body's size in bytes"
            ) from None
        if length < 0:
            self.close_connection = True
            raise ApiError(400, "Content-Length must not be negative")
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            self._drain(length)
            raise ApiError(413, f"the request body has {length} bytes; the limit is {MAX_BODY_BYTES}")
        data = self.rfile.read(length)
        if len(data) < length:
            raise ClientGone
        try:
            body = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError, RecursionError) as err:
            raise ApiError(400, f"the request body is not valid JSON: {err}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def _drain(self, length: int) -> None:
        """Read and drop an oversize body (up to a limit) so the client is reading when the 413 arrives."""
        left = min(length, MAX_DRAIN_BYTES)
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 16))
            if not chunk:
                return
            left -= len(chunk)

    # ---- endpoints ----

    def handle_page(self, path: str) -> None:
        self._send_web_file("index.html")

    def handle_web_file(self, path: str) -> None:
        self._send_web_file(path.removeprefix(WEB_PREFIX))

    def _send_web_file(self, name: str) -> None:
        found = web.page_file(name)
        if found is None:
            raise ApiError(404, f"the chat page has no file {name!r}", code="not_found")
        data, content_type = found
        self._send_bytes(200, data, content_type, web.HEADERS)

    def handle_health(self, path: str) -> None:
        self._send_json(200, {"status": "ok", "queued": self.server.worker.queued})

    def handle_models(self, path: str) -> None:
        self._send_json(200, self.server.models_list())

    def handle_model(self, path: str) -> None:
        self._send_json(200, self.server.models_list()["data"][0])

    def handle_tokenize(self, path: str) -> None:
        self._send_json(200, llama_server_api.tokenize(self._read_json(), self.server.lm))

    def handle_detokenize(self, path: str) -> None:
        self._send_json(200, llama_server_api.detokenize(self._read_json(), self.server.lm))

    def handle_props(self, path: str) -> None:
        server = self.server
        self._send_json(200, llama_server_api.props(server.lm, server.model_id, server.max_tokens))

    def handle_metrics(self, path: str) -> None:
        worker = self.server.worker
        text = self.server.metrics.render(worker.running, worker.queued)
        self._send_bytes(200, text.encode("utf-8"), METRICS_CONTENT_TYPE)

    def handle_chat_completions(self, path: str) -> None:
        self._complete(CHAT)

    def handle_completions(self, path: str) -> None:
        self._complete(TEXT)

    def _complete(self, kind: str) -> None:
        body = self._read_json()
        server = self.server
        model = server.model_name(body)
        request = parse_request(kind, body, server.lm, server.max_tokens)
        generation = server.lm.start(
            request.prompt_tokens, cancel=threading.Event(), explain=request.explain, **request.sampling
        )
        answer = Answer(kind, model)
        job = server.worker.submit(generation, answer.id)
        try:
            if request.stream:
                self._stream(job, answer, request.include_usage)
            else:
                self._wait_done(job)
                self._send_json(200, answer.complete(generation))
        finally:
            generation.cancel.set()  # no-op when finished; frees the decode loop when we leave early

    def _next_event(self, job: Job) -> tuple[str, Any]:
        """The job's next event; meanwhile checks, every POLL_SECONDS, that the client is still connected."""
        while True:
            now = time.monotonic()
            if now >= self._next_check:
                self._next_check = now + POLL_SECONDS
                if self._client_gone():
                    raise ClientGone
            try:
                return job.events.get(timeout=POLL_SECONDS)
            except queue.Empty:
                pass

    def _wait_done(self, job: Job) -> None:
        while True:
            kind, value = self._next_event(job)
            if kind == "error":
                raise _as_api_error(value)
            if kind == "done":
                return

    def _stream(self, job: Job, answer: Answer, include_usage: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._started = True
        self._send_event(answer.chunk("", first=True))
        while True:
            kind, value = self._next_event(job)
            if kind == "piece":
                self._send_event(answer.chunk(value, generation=job.generation))
            elif kind == "error":
                raise _as_api_error(value)
            else:
                break
        self._send_event(answer.final_chunk(job.generation))
        if include_usage:
            self._send_event(answer.usage_chunk(job.generation))
        self._end_stream()

    def _send_event(self, obj: dict[str, Any] | None) -> None:
        """One server-sent event `data: {...}` (None sends `data: [DONE]`) as one HTTP chunk."""
        payload = b"[DONE]" if obj is None else json.dumps(obj, ensure_ascii=False).encode("utf-8")
        event = b"data: " + payload + b"\n\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))

    def _end_stream(self) -> None:
        self._send_event(None)
        self.wfile.write(b"0\r\n\r\n")

    def _client_gone(self) -> bool:
        """True when the peer closed the connection (readable with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _as_api_error(err: Exception) -> ApiError:
    if isinstance(err, ApiError):
        return err
    if isinstance(err, UserError):
        return ApiError(400, str(err))
    return ApiError(500, "the generation failed; see the server's log", kind="server_error")
