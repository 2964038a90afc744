"""What an HTTP request to a served model may be, and where each limit is enforced.

- **Headers** (fixed): at most ``MAX_HEADERS`` headers of ``MAX_HEADER_BYTES`` in all, an
  ``X-Request-Id`` of at most ``MAX_REQUEST_ID`` characters; otherwise 431. Checked by
  :class:`HeaderGuard` in Serve's HTTP proxy (``proxy_middlewares``, installed through
  Ray's ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``: there it runs before Serve echoes and
  logs the request id) and again in the app (a cluster whose proxies lack the callback).
- **Body** (per deployment, :class:`BodyLimits`): at most ``max_bytes`` (413, from
  ``Content-Length`` at once, else as the body streams in, before anything is parsed), sent
  within ``timeout_s`` (408), or the client closed the connection first (400, to nobody).
  Read by :func:`read_body` in the replica: Ray Serve forwards a request before its body
  has arrived, so a slow body waits there, as one cheap coroutine among the deployment's
  ``max_ongoing_requests``. A small body that arrives at once is read ahead by the proxy
  (:class:`BodyAhead`) and comes with the request: the replica need not call back for it.
"""

from __future__ import annotations

import asyncio

from pydantic import Field
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from trainables.declared import Declared

from .errors import RequestError
from .schemas import MAX_FRAMES

MAX_HEADERS = 64
MAX_HEADER_BYTES = 16 * 1024  # names, values and ": \r\n" of all headers together
MAX_REQUEST_ID = 128
MAX_BODY_AHEAD = 256 * 1024  # a body up to this long is read by the proxy and sent with the request
SCOPE_BODY = "pyrosweep.body"
AHEAD_WAIT_S = 1.0  # how long the proxy waits for such a body before passing it on as it comes

# The most bytes one value takes in a body: "null, " (missing) for a binary model, a float64
# written in full ("-1.2345678901234567e-123, ") otherwise; each frame adds "[], ".
BYTES_PER_VALUE = {"binary": 6, "categorical": 6, "counts": 12, "real": 26}
BYTES_PER_FRAME = 4
BYTES_AROUND = 64 * 1024  # keys, sequence brackets, white space


def default_body_bytes(data_dim: int, observation: str) -> int:
    """The byte limit of a body by default: ``MAX_FRAMES`` frames of ``data_dim`` values,
    each written as long as JSON writes it, plus what surrounds them."""
    return MAX_FRAMES * (data_dim * BYTES_PER_VALUE[observation] + BYTES_PER_FRAME) + BYTES_AROUND


class BodyLimits(Declared):
    """A deployment's limits on request bodies (``pyrosweep serve --max-body-mb``,
    ``--body-timeout-s``)."""

    max_bytes: int | None = Field(
        None, ge=1, description="bytes per body; default: sized from the frame limit and the model's data_dim"
    )
    timeout_s: float = Field(10.0, gt=0, description="seconds a client has to send its whole body")

    def bytes_for(self, data_dim: int, observation: str) -> int:
        return self.max_bytes if self.max_bytes is not None else default_body_bytes(data_dim, observation)


def header_problem(headers: list[tuple[bytes, bytes]]) -> str | None:
    """What is wrong with an ASGI scope's ``headers``, or None."""
    if len(headers) > MAX_HEADERS:
        return f"headers: {len(headers)} headers; the limit is {MAX_HEADERS}"
    size = sum(len(name) + len(value) + 4 for name, value in headers)
    if size > MAX_HEADER_BYTES:
        return f"headers: {size} bytes; the limit is {MAX_HEADER_BYTES}"
    for name, value in headers:
        if name.lower() == b"x-request-id" and len(value) > MAX_REQUEST_ID:
            return f"x-request-id: {len(value)} characters; the limit is {MAX_REQUEST_ID}"
    return None


class HeaderGuard:
    """ASGI middleware: a request whose headers pass :func:`header_problem` goes on, any
    other gets a 431 with its ``detail``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        problem = header_problem(scope["headers"]) if scope["type"] == "http" else None
        if problem is None:
            await self.app(scope, receive, send)
        else:
            await JSONResponse({"detail": problem}, status_code=431)(scope, receive, send)


class BodyAhead:
    """ASGI middleware of Serve's proxies: a body of at most ``MAX_BODY_AHEAD`` bytes (by
    its ``Content-Length``) that arrives within ``AHEAD_WAIT_S`` is read in the proxy and
    travels to the replica in the request's scope (``scope[SCOPE_BODY]``), which spares the
    replica its call back to the proxy for it. A slower body goes on as it is (what came
    so far replayed first): the replica reads the rest under its own limits."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = dict(scope["headers"]).get(b"content-length", b"") if scope["type"] == "http" else b""
        if not (declared.isdigit() and int(declared) <= MAX_BODY_AHEAD):
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        try:
            async with asyncio.timeout(AHEAD_WAIT_S):
                while not messages or messages[-1].get("more_body", False):
                    messages.append(await receive())
                    if messages[-1]["type"] == "http.disconnect":
                        return  # the client left: nobody to answer
        except TimeoutError:

            async def replay() -> Message:
                return messages.pop(0) if messages else await receive()

            await self.app(scope, replay, send)
            return
        await self.app({**scope, SCOPE_BODY: b"".join(m.get("body", b"") for m in messages)}, receive, send)


def proxy_middlewares() -> list[Middleware]:
    """The middlewares of Serve's HTTP proxies: Ray calls this in each proxy when
    ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` is ``serve.limits:proxy_middlewares``
    (``cluster.local_ray.PROXY_ENV``)."""
    return [Middleware(BodyAhead), Middleware(HeaderGuard)]


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The whole body of ``request``, or the ``RequestError`` of a body over ``max_bytes``
    (413: from ``Content-Length`` before reading, else once the bytes pass it), not sent
    within ``timeout_s`` (408) or cut short by the client (400)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, f"content-length: expected a number of bytes, got {declared[:40]!r}")
        if int(declared) > max_bytes:
            raise RequestError(413, f"body: {declared} bytes; the limit is {max_bytes}")
    if SCOPE_BODY in request.scope:  # read ahead by the proxy (BodyAhead), as long as declared
        return request.scope[SCOPE_BODY]
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise RequestError(413, f"body: more than {max_bytes} bytes; the limit is {max_bytes}")
                chunks.append(chunk)
    except TimeoutError:
        expected = f" of {declared}" if declared is not None else ""
        raise RequestError(408, f"body: {size}{expected} bytes arrived in {timeout_s} s; send it faster") from None
    except ClientDisconnect:
        raise RequestError(400, f"body: the client closed the connection after {size} bytes") from None
    return b"".join(chunks)
