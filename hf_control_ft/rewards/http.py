"""A reward served over HTTP: the client (:class:`HTTPReward`, ``--reward`` / ``--oracle http(s)://...``) and the
reference server (:class:`RewardServer`, ``hf-control-ft serve-reward``).

Large scorers (a VLM judge, an OCR pipeline, a preference model on its own GPU) usually run as a service on
another machine. The protocol is one JSON POST per batch::

    POST <url>        Authorization: Bearer <token>          (when the server has a token)
                      Content-Type: application/json         Idempotency-Key: <random id, the same on retries>
    {"images": ["<base64 PNG>", ...], "prompts": ["...", ...] | null}
    200 {"scores": [float, ...]}                              (one per image, in order)

Images are the samples in ``[0, 1]`` as 8-bit PNGs (what a person or any image model would see). A served reward
has no gradient: ELEGANT refuses it before any model loads and names SEIKO, whose oracle it can be.

**Client.** A batch is split into requests of ``batch_size`` images, up to ``max_concurrency`` at once, each with
``timeout`` seconds; connection errors, timeouts, 429 and 5xx answers are retried ``max_retries`` times with
exponential backoff and the *same* idempotency key, so a server that scored a request whose answer was lost
answers the retry from its cache instead of scoring (and billing) it again. Every request's result is kept: a
request refused with another 4xx (an item the server cannot score) is asked again image by image, so one bad
image costs its request's images once more, not the batch; images that still fail come back as NaN (a failed
query for SEIKO's oracle, with the reason in the result's ``errors``). Only when no image at all was scored does
the call raise :class:`RewardServerError` (``batch_failure=True``: the service failed, not an item). Redirects are
never followed: the token would go wherever the redirect points. The token (``token=``, or the
``HF_CONTROL_FT_REWARD_TOKEN`` environment variable) goes only into the ``Authorization`` header: it is never in a
name, a log line or an error.

**Server.** PNG only, each image's pixel count checked against ``max_pixels`` from its header before anything is
decoded, at most ``max_images`` per request and ``MAX_REQUEST_BYTES`` per body; decoding and scoring run one
request at a time; answers are kept by idempotency key (the last ``CACHE_SIZE``); connections are bounded and idle
ones closed, every bad request is answered ``4xx`` (``utils/http_server.py``). Without a token it listens on the
loopback interface only and answers only ``localhost`` requests.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus

import torch

from ..utils.http_server import HANDLER_TIMEOUT, BoundedHTTPServer, RequestError, SafeHandler, is_loopback_host
from ..utils.images import from_png, to_png

TOKEN_ENV = "HF_CONTROL_FT_REWARD_TOKEN"
MAX_REQUEST_BYTES = 256 * 2**20
#: server defaults: pixels per image (2048 x 2048) and images per request
MAX_PIXELS = 2048 * 2048
MAX_IMAGES = 64
#: answers the server keeps by idempotency key
CACHE_SIZE = 4096
#: answers that refuse a request for what it holds: asked again image by image (401, 403, 404 and the like are not)
SPLIT_STATUSES = (400, 413, 422)


class RewardServerError(RuntimeError):
    """A served reward could not be obtained (one line: the URL without credentials, the reason).

    ``retryable``: the failure may pass (connection, timeout, 429, 5xx); ``batch_failure``: no image of the call was
    scored (the service failed, not one item: asking items one by one cannot help)."""

    def __init__(self, message: str, retryable: bool = False, batch_failure: bool = False, status: int | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.batch_failure = batch_failure
        self.status = status  # the HTTP status of the last answer, if any


def is_reward_url(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(("http://", "https://"))


def public_url(url: str) -> str:
    """``url`` without user info, query or fragment (what names the reward in logs and errors)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    return urllib.parse.urlunsplit((parts.scheme, netloc + (f":{parts.port}" if parts.port else ""), parts.path,
                                    "", ""))


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuses every redirect: urllib would resend the ``Authorization`` header to the new location."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # urllib then raises HTTPError with the 3xx code


_OPENER = urllib.request.build_opener(_NoRedirect)


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

    Counters: ``images_sent`` (images in every request made, retries included: what a paid service bills).
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
        self.images_sent = 0
        self._count_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"HTTPReward({self.__name__!r})"

    def __call__(self, images: torch.Tensor, prompts=None) -> torch.Tensor:
        """Scores ``(B,)`` float32 (NaN for an image that could not be scored; the reasons in ``.errors``, one
        string per image, empty when scored)."""
        if images.dim() == 5:  # videos: every frame is scored as an image and the frames' scores averaged
            from .image_rewards import per_frame

            return per_frame(self, images, prompts, "mean")
        n = images.shape[0]
        if prompts is not None and len(prompts) != n:
            raise ValueError(f"reward server {self.__name__}: {len(prompts)} prompts for {n} images")
        pngs = [base64.b64encode(to_png(x)).decode("ascii") for x in images.detach()]
        chunks = [(i, min(i + self.batch_size, n)) for i in range(0, n, self.batch_size)]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(chunks))) as pool:
            parts = list(pool.map(lambda c: self._score_chunk(pngs[c[0]:c[1]], None if prompts is None else
                                                              list(prompts[c[0]:c[1]])), chunks))
        values = [v for part in parts for v, _ in part]
        errors = [e for part in parts for _, e in part]
        if n and all(errors):
            raise RewardServerError(errors[0], retryable=True, batch_failure=True)
        scores = torch.tensor(values, dtype=torch.float32, device=images.device)
        scores.errors = errors
        return scores

    def _score_chunk(self, pngs: list[str], prompts) -> list[tuple[float, str]]:
        """``(value, error)`` per image of one request; a request refused for its content (a 4xx other than 429) is
        asked again image by image, so only the images the server cannot score fail."""
        try:
            return [(v, "") for v in self._score(pngs, prompts)]
        except RewardServerError as err:
            if len(pngs) == 1 or err.status not in SPLIT_STATUSES:
                return [(float("nan"), str(err))] * len(pngs)
        out = []
        for i, png in enumerate(pngs):
            try:
                out.append((self._score([png], None if prompts is None else [prompts[i]])[0], ""))
            except RewardServerError as err:
                out.append((float("nan"), str(err)))
        return out

    def _score(self, pngs: list[str], prompts) -> list[float]:
        body = json.dumps({"images": pngs, "prompts": prompts}).encode("utf-8")
        headers = {"Content-Type": "application/json", "Idempotency-Key": uuid.uuid4().hex}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        last, retryable, status = "no attempt", False, None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            with self._count_lock:
                self.images_sent += len(pngs)
            try:
                with _OPENER.open(request, timeout=self.timeout) as answer:
                    return self._scores(answer.read(), len(pngs))
            except urllib.error.HTTPError as err:
                detail = err.read(300).decode("utf-8", "replace").strip()
                last = f"HTTP {err.code} {err.reason}" + (f": {detail}" if detail else "")
                if 300 <= err.code < 400:
                    last = (f"HTTP {err.code}: the server redirects, and redirects are not followed (the token would "
                            "go to the new location): use the final URL")
                retryable, status = err.code == 429 or err.code >= 500, err.code
                if not retryable:
                    break
            except (urllib.error.URLError, TimeoutError, OSError) as err:
                reason = getattr(err, "reason", err)
                last = f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
                retryable, status = True, None
        raise RewardServerError(f"reward server {self.__name__}: {last} (after {attempt + 1} attempt(s))",
                                retryable=retryable, status=status)

    def _scores(self, raw: bytes, n: int) -> list[float]:
        try:
            scores = json.loads(raw)["scores"]
            values = [float(s) for s in scores]
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError):
            raise RewardServerError(f"reward server {self.__name__}: the answer is not {{\"scores\": [numbers]}}: "
                                    f"{raw[:200]!r}") from None
        if len(values) != n:
            raise RewardServerError(f"reward server {self.__name__}: {len(values)} scores for {n} images")
        return values


def _parse_request(raw: bytes, max_images: int) -> tuple[list[str], list[str] | None]:
    """``(base64 PNGs, prompts)`` of a request body, checked field by field (``RequestError`` 400 otherwise)."""
    try:
        request = json.loads(raw)
    except (ValueError, RecursionError):
        raise RequestError(HTTPStatus.BAD_REQUEST, "the body is not JSON") from None
    if not isinstance(request, dict) or not isinstance(request.get("images"), list):
        raise RequestError(HTTPStatus.BAD_REQUEST, 'expected {"images": [base64 PNG, ...], "prompts": [...] | null}')
    images, prompts = request["images"], request.get("prompts")
    if not images:
        raise RequestError(HTTPStatus.BAD_REQUEST, "no images")
    if len(images) > max_images:
        raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"{len(images)} images; at most {max_images} per "
                           "request")
    if not all(isinstance(p, str) for p in images):
        raise RequestError(HTTPStatus.BAD_REQUEST, "images must be base64 strings")
    if prompts is not None and (not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts)
                                or len(prompts) != len(images)):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"prompts must be null or {len(images)} strings")
    return images, prompts


def _decode(images: list[str], max_pixels: int) -> torch.Tensor:
    """``(B, 3, H, W)`` from base64 PNGs: each checked against ``max_pixels`` from its header before decoding."""
    decoded = []
    for i, text in enumerate(images):
        try:
            decoded.append(from_png(base64.b64decode(text, validate=True), max_pixels=max_pixels))
        except (ValueError, binascii.Error, OSError) as err:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"image {i}: {err}"[:300]) from None
    if len({tuple(x.shape) for x in decoded}) != 1:
        raise RequestError(HTTPStatus.BAD_REQUEST, "the images of one request must have one size")
    return torch.stack(decoded)


class _Handler(SafeHandler):
    server: "RewardServer"

    def _authorise(self) -> None:
        if self.server.token is None:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.server.token}".encode()):
            raise RequestError(HTTPStatus.UNAUTHORIZED, "missing or wrong Bearer token")

    def handle_get(self) -> None:
        self._authorise()
        self.send_json(HTTPStatus.OK, {"reward": self.server.reward_name, "ok": True})

    def handle_post(self) -> None:
        self._authorise()
        raw = self.read_body(MAX_REQUEST_BYTES)
        images, prompts = _parse_request(raw, self.server.max_images)
        key = self.headers.get("Idempotency-Key")
        self.server.count_received(len(images))
        try:
            scores = self.server.answer(key, raw, images, prompts)
        except RequestError:
            raise
        except (ValueError, TypeError) as err:  # the reward refuses this content: 422, the client asks item by item
            raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, f"{type(err).__name__}: {err}"[:300]) from None
        except Exception as err:  # noqa: BLE001 - the reward failed on this batch: say why, keep serving
            raise RequestError(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(err).__name__}: {err}"[:300]) from None
        self.send_json(HTTPStatus.OK, {"scores": scores})


class RewardServer(BoundedHTTPServer):
    """Serves ``reward(images, prompts)`` at every path (module docstring); one request is decoded and scored at a
    time.

    Refuses to listen beyond the loopback interface without a token.

    Args:
        max_pixels: pixels per image (checked from the PNG header before decoding).
        max_images: images per request.
        max_connections: connections served at once (``utils/http_server.py``).
        handler_timeout: seconds an idle connection is kept open.
    """

    def __init__(self, reward, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
                 device: str | torch.device = "cpu", name: str | None = None, max_pixels: int = MAX_PIXELS,
                 max_images: int = MAX_IMAGES, max_connections: int = 32, handler_timeout: float = HANDLER_TIMEOUT):
        if token is None and not is_loopback_host(host):
            raise ValueError(f"serving a reward on {host!r} (beyond this machine) needs a token "
                             f"(--token_file or ${TOKEN_ENV})")
        if not (max_pixels >= 1 and max_images >= 1):
            raise ValueError("max_pixels and max_images must be >= 1")
        handler = type("RewardHandler", (_Handler,), {"token_required": token is not None,
                                                      "timeout": float(handler_timeout)})
        super().__init__((host, port), handler, max_connections=max_connections)
        self.reward, self.token, self.device = reward, token, torch.device(device)
        self.reward_name = name or getattr(reward, "__name__", type(reward).__name__)
        self.max_pixels, self.max_images = int(max_pixels), int(max_images)
        self._lock = threading.Lock()
        self._answers: OrderedDict[str, tuple[str, list[float]]] = OrderedDict()
        self.images_scored = 0  # images decoded and scored (an answer from the cache scores none)
        self.images_received = 0  # images in every well-formed request, refused or not

    def count_received(self, n: int) -> None:
        with self._lock:
            self.images_received += n

    def answer(self, key: str | None, raw: bytes, images: list[str], prompts) -> list[float]:
        """Scores of one request: the kept answer of an earlier request with the same idempotency key and body, else
        decoded and scored now (one request at a time: decoding memory is bounded by one request)."""
        digest = hashlib.sha256(raw).hexdigest()
        with self._lock:
            if key and key in self._answers:
                kept_digest, scores = self._answers[key]
                if kept_digest != digest:
                    raise RequestError(HTTPStatus.CONFLICT, "this Idempotency-Key was used for another request")
                return scores
            scores = self.score(_decode(images, self.max_pixels), prompts)
            self.images_scored += len(images)
            if key:
                self._answers[key] = (digest, scores)
                while len(self._answers) > CACHE_SIZE:
                    self._answers.popitem(last=False)
            return scores

    def score(self, images: torch.Tensor, prompts) -> list[float]:
        from .image_rewards import call_reward

        with torch.no_grad():
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


__all__ = ["HTTPReward", "RewardServer", "RewardServerError", "TOKEN_ENV", "is_reward_url", "public_url",
           "MAX_PIXELS", "MAX_IMAGES"]
