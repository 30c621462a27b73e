"""A reward served over HTTP: the client (:class:`HTTPReward`, ``--reward`` / ``--oracle http(s)://...``) and the
reference server (:class:`RewardServer`, ``hf-control-ft serve-reward``).

Large scorers (a VLM judge, an OCR pipeline, a preference model on its own GPU) usually run as a service on
another machine. The protocol is one JSON POST per batch::

    POST <url>        Authorization: Bearer <token>          (when the server has a token)
    {"images": ["<base64 PNG>", ...], "prompts": ["...", ...] | null}
    200 {"scores": [float, ...]}                              (one per image, in order)

Images are the samples in ``[0, 1]`` as 8-bit PNGs (what a person or any image model would see). A served reward
has no gradient: ELEGANT refuses it before any model loads and names SEIKO, whose oracle it can be.

The client splits a batch into requests of ``batch_size`` images, sends up to ``max_concurrency`` at once, gives each
``timeout`` seconds and retries connection errors, timeouts, 429 and 5xx answers ``max_retries`` times with
exponential backoff; other 4xx answers fail at once with the server's message. The token (``token=``, or the
``HF_CONTROL_FT_REWARD_TOKEN`` environment variable) goes only into the ``Authorization`` header: it is never in a
name, a log line or an error.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from ..utils.images import from_png, to_png

TOKEN_ENV = "HF_CONTROL_FT_REWARD_TOKEN"
MAX_REQUEST_BYTES = 256 * 2**20


class RewardServerError(RuntimeError):
    """A served reward could not be obtained (one line: the URL without credentials, the reason)."""


def is_reward_url(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(("http://", "https://"))


def public_url(url: str) -> str:
    """``url`` without user info, query or fragment (what names the reward in logs and errors)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    return urllib.parse.urlunsplit((parts.scheme, netloc + (f":{parts.port}" if parts.port else ""), parts.path,
                                    "", ""))


class HTTPReward:
    """``fn(images, prompts) -> (B,)`` scores from a reward server (module docstring); not differentiable.

    Args:
        url: the scoring endpoint, ``http(s)://host[:port]/path``.
        token: Bearer token (default: ``$HF_CONTROL_FT_REWARD_TOKEN``; none: no header).
        timeout: seconds per request.
        max_retries: further attempts after a retryable failure (connection, timeout, 429, 5xx).
        batch_size: images per request.
        max_concurrency: requests in flight at once.
        backoff: seconds before the first retry, doubled at each further one.
    """

    def __init__(self, url: str, token: str | None = None, timeout: float = 120.0, max_retries: int = 3,
                 batch_size: int = 16, max_concurrency: int = 4, backoff: float = 1.0):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"reward URL must be http(s)://host[:port]/path, got {public_url(url)!r}")
        if batch_size < 1 or max_concurrency < 1 or max_retries < 0 or not timeout > 0:
            raise ValueError("HTTPReward: batch_size and max_concurrency must be >= 1, max_retries >= 0, timeout > 0")
        self.url = url
        self._token = token if token is not None else os.environ.get(TOKEN_ENV)
        self.timeout, self.max_retries, self.backoff = float(timeout), int(max_retries), float(backoff)
        self.batch_size, self.max_concurrency = int(batch_size), int(max_concurrency)
        self.__name__ = public_url(url)

    def __repr__(self) -> str:
        return f"HTTPReward({self.__name__!r})"

    def __call__(self, images: torch.Tensor, prompts=None) -> torch.Tensor:
        if images.dim() == 5:  # videos: every frame is scored as an image and the frames' scores averaged
            from .image_rewards import per_frame

            return per_frame(self, images, prompts, "mean")
        n = images.shape[0]
        if prompts is not None and len(prompts) != n:
            raise ValueError(f"reward server {self.__name__}: {len(prompts)} prompts for {n} images")
        pngs = [base64.b64encode(to_png(x)).decode("ascii") for x in images.detach()]
        chunks = [(i, min(i + self.batch_size, n)) for i in range(0, n, self.batch_size)]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(chunks))) as pool:
            parts = list(pool.map(lambda c: self._score(pngs[c[0]:c[1]], None if prompts is None else
                                                        list(prompts[c[0]:c[1]])), chunks))
        return torch.tensor([s for part in parts for s in part], dtype=torch.float32, device=images.device)

    def _score(self, pngs: list[str], prompts) -> list[float]:
        body = json.dumps({"images": pngs, "prompts": prompts}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                    return self._scores(answer.read(), len(pngs))
            except urllib.error.HTTPError as err:
                detail = err.read(300).decode("utf-8", "replace").strip()
                last = f"HTTP {err.code} {err.reason}" + (f": {detail}" if detail else "")
                if err.code != 429 and err.code < 500:
                    break
            except (urllib.error.URLError, TimeoutError, OSError) as err:
                reason = getattr(err, "reason", err)
                last = f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
        raise RewardServerError(f"reward server {self.__name__}: {last} (after {attempt + 1} attempt(s))")

    def _scores(self, raw: bytes, n: int) -> list[float]:
        try:
            scores = json.loads(raw)["scores"]
            values = [float(s) for s in scores]
        except (ValueError, KeyError, TypeError):
            raise RewardServerError(f"reward server {self.__name__}: the answer is not {{\"scores\": [numbers]}}: "
                                    f"{raw[:200]!r}") from None
        if len(values) != n:
            raise RewardServerError(f"reward server {self.__name__}: {len(values)} scores for {n} images")
        return values


class _Handler(BaseHTTPRequestHandler):
    server: "RewardServer"

    def log_message(self, format, *args):  # noqa: A002 - requests are not logged (no token, no payload)
        pass

    def _send(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _authorised(self) -> bool:
        if self.server.token is None:
            return True
        given = self.headers.get("Authorization", "")
        ok = hmac.compare_digest(given.encode(), f"Bearer {self.server.token}".encode())
        if not ok:
            self._send(401, {"error": "missing or wrong Bearer token"})
        return ok

    def do_GET(self):  # noqa: N802
        if self._authorised():
            self._send(200, {"reward": self.server.reward_name, "ok": True})

    def do_POST(self):  # noqa: N802
        if not self._authorised():
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_REQUEST_BYTES:
                return self._send(413, {"error": f"request over {MAX_REQUEST_BYTES} bytes"})
            request = json.loads(self.rfile.read(length))
            images = torch.stack([from_png(base64.b64decode(p)) for p in request["images"]])
            prompts = request.get("prompts")
            if prompts is not None and len(prompts) != len(images):
                raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
        except (ValueError, KeyError, TypeError, OSError) as err:
            return self._send(400, {"error": f"{type(err).__name__}: {err}"[:300]})
        try:
            scores = self.server.score(images, prompts)
        except Exception as err:  # noqa: BLE001 - the reward failed on this batch: say why, keep serving
            return self._send(500, {"error": f"{type(err).__name__}: {err}"[:300]})
        self._send(200, {"scores": scores})


class RewardServer(ThreadingHTTPServer):
    """Serves ``reward(images, prompts)`` at every path (module docstring); one batch is scored at a time.

    Refuses to listen beyond the loopback interface without a token.
    """

    daemon_threads = True

    def __init__(self, reward, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
                 device: str | torch.device = "cpu", name: str | None = None):
        if token is None and not _is_loopback(host):
            raise ValueError(f"serving a reward on {host!r} (beyond this machine) needs a token "
                             f"(--token_file or ${TOKEN_ENV})")
        super().__init__((host, port), _Handler)
        self.reward, self.token, self.device = reward, token, torch.device(device)
        self.reward_name = name or getattr(reward, "__name__", type(reward).__name__)
        self._lock = threading.Lock()

    def score(self, images: torch.Tensor, prompts) -> list[float]:
        from .image_rewards import call_reward

        with self._lock, torch.no_grad():
            values = call_reward(self.reward, images.to(self.device), prompts)
        values = torch.as_tensor(values).detach().float().flatten().cpu()
        if values.numel() != images.shape[0] or not torch.isfinite(values).all():
            raise ValueError(f"the reward returned {values.numel()} values (non-finite: "
                             f"{int((~torch.isfinite(values)).sum())}) for {images.shape[0]} images")
        return values.tolist()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/score"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


__all__ = ["HTTPReward", "RewardServer", "RewardServerError", "TOKEN_ENV", "is_reward_url", "public_url"]
