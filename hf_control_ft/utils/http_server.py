"""What every HTTP server of the library shares so that a hostile or careless client cannot harm it (the reward
server, ``rewards/http.py``; the rating page, ``feedback/rating_server.py``):

* **bounded threads**: at most ``max_connections`` connections are served at once; one more is answered ``503``
  and closed at once (the process's other threads -- a trainer's, under ``--oracle human`` -- can still start);
* **handler timeouts**: a connection idle for ``timeout`` seconds (default 30) is closed;
* **bodies**: ``Content-Length`` must be an integer in ``0..max_bytes`` (missing on a POST: ``411``; negative or
  malformed: ``400``; larger: ``413``), chunked bodies are refused, a body shorter than announced is ``400``;
* **local only without a token**: a token-less server answers only requests whose ``Host`` is a loopback name
  (``localhost``, ``127.0.0.1``, ``[::1]``), so a web page that rebinds its own domain to ``127.0.0.1`` cannot read
  answers, and POSTs must be ``application/json``, which no web page can send across origins without a CORS
  preflight these servers never grant;
* **every error answered**: a handler that raises answers ``500`` (nothing of the error but its type), never a
  dropped connection that a client would retry.
"""

from __future__ import annotations

import ipaddress
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

#: seconds a connection may stay idle (no request line, no body byte) before it is closed
HANDLER_TIMEOUT = 30.0
#: connections served at once
MAX_CONNECTIONS = 32
_REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: 36\r\n"
            b"Connection: close\r\n\r\n{\"error\": \"too many connections\"}\r\n")


class RequestError(Exception):
    """A request refused with ``status`` and a one-line ``message`` (sent to the client as ``{"error": ...}``)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = int(status)


class BoundedHTTPServer(ThreadingHTTPServer):
    """A ``ThreadingHTTPServer`` serving at most ``max_connections`` connections at once (module docstring)."""

    daemon_threads = True

    def __init__(self, address, handler, max_connections: int = MAX_CONNECTIONS):
        if not (isinstance(max_connections, int) and max_connections >= 1):
            raise ValueError(f"max_connections must be an int >= 1, got {max_connections!r}")
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            try:
                request.sendall(_REFUSED)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (an interface to listen on, or a ``Host`` header's name) is this machine only."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(header: str | None) -> str:
    """The name of a ``Host`` header without its port (``[::1]:8000`` -> ``::1``)."""
    header = (header or "").strip()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class SafeHandler(BaseHTTPRequestHandler):
    """A request handler with the module's guarantees; subclasses write ``handle_get`` / ``handle_post`` and send
    with :meth:`send_json` / :meth:`send_bytes`; a :class:`RequestError` they raise is answered with its status."""

    timeout = HANDLER_TIMEOUT
    protocol_version = "HTTP/1.1"
    #: extra headers on every answer
    extra_headers: dict = {}
    #: whether a token protects this server (when not, only loopback ``Host`` names are served)
    token_required = False

    def log_message(self, format, *args):  # noqa: A002 - requests are never logged (tokens, ids in paths)
        pass

    def send_bytes(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in self.extra_headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)
        self._answered = True

    def send_json(self, status: int, payload: dict) -> None:
        import json

        self.send_bytes(status, json.dumps(payload).encode("utf-8"), "application/json")

    def read_body(self, max_bytes: int, json_only: bool = True) -> bytes:
        """The request body (module docstring: length, chunked and content-type rules)."""
        if json_only:
            content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if content_type != "application/json":
                raise RequestError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "Content-Type must be application/json")
        if self.headers.get("Transfer-Encoding"):
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "chunked bodies are not accepted: send Content-Length")
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
        try:
            length = int(raw.strip())
        except ValueError:
            raise RequestError(HTTPStatus.BAD_REQUEST, "Content-Length is not an integer") from None
        if length < 0:
            raise RequestError(HTTPStatus.BAD_REQUEST, "Content-Length is negative")
        if length > max_bytes:
            self.close_connection = True  # the body is not read: the connection cannot be reused
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request over {max_bytes} bytes")
        data = self.rfile.read(length)
        self._body_read = True
        if len(data) != length:
            raise RequestError(HTTPStatus.BAD_REQUEST, "the body is shorter than its Content-Length")
        return data

    def _check_host(self) -> None:
        if not self.token_required and not is_loopback_host(host_name(self.headers.get("Host"))):
            raise RequestError(HTTPStatus.FORBIDDEN, "this server has no token and answers only requests to "
                               "localhost / 127.0.0.1 / [::1]")

    def _dispatch(self, method) -> None:
        self._answered = self._body_read = False
        try:
            self._check_host()
            method()
        except RequestError as err:
            if self.command == "POST" and not self._body_read:
                self.close_connection = True  # an unread body must not be parsed as the next request
            if not self._answered:
                self.send_json(err.status, {"error": str(err)})
        except Exception as err:  # noqa: BLE001 - a bug or a hostile request: answer it, keep serving
            if not self._answered:
                self.close_connection = True
                self.send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error ({type(err).__name__})"})

    def do_GET(self):  # noqa: N802 - http.server's name
        self._dispatch(self.handle_get)

    def do_POST(self):  # noqa: N802
        self._dispatch(self.handle_post)

    def handle_get(self) -> None:
        raise RequestError(HTTPStatus.METHOD_NOT_ALLOWED, "GET is not served here")

    def handle_post(self) -> None:
        raise RequestError(HTTPStatus.METHOD_NOT_ALLOWED, "POST is not served here")


__all__ = ["BoundedHTTPServer", "SafeHandler", "RequestError", "is_loopback_host", "host_name", "HANDLER_TIMEOUT",
           "MAX_CONNECTIONS"]
