"""JSON API under ``/api/v1/``: the dashboard's operations for scripts.

Bearer tokens (``nekojump-admin token create NAME``) or a browser session
(then state changes need the ``X-CSRF-Token`` header).  Errors are
``{"error": code, "message": text}`` with a 4xx status (503 when the database
fails: nothing was changed).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

from klein import Klein
from twisted.web.iweb import IRequest
from werkzeug.routing import Map, Rule

from nekojump.model import KeyRecord, Member, Refused, RegisteredPort
from nekojump.web.auth import CSRF_HEADER, Viewer
from nekojump.web.backend import STORE_FAILED, Backend, log_store_failure
from nekojump.web.openapi import PAGE_ROWS, openapi_document
from nekojump.web.views import key_row, port_row, tunnel_rows

#: HTTP status for each refusal code; anything else is a 400.
STATUS = {
    "unauthenticated": 401,
    "csrf": 403,
    "forbidden": 403,
    "no-such-key": 404,
    "no-such-port": 404,
    "no-such-member": 404,
    "key-exists": 409,
    "port-registered": 409,
    "port-held": 409,
    "too-many-keys": 409,
    "too-many-ports": 409,
    "too-many-changes": 429,
    "not-found": 404,
    "method-not-allowed": 405,
    "storage-unavailable": 503,
}

#: Where ``Api`` is mounted (``Dashboard.api_branch``).
API_PREFIX = "/api/v1"


class ApiError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class NameRepeated(ValueError):
    """A JSON object names a field twice (``json`` would keep the last silently)."""


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    body = dict(pairs)
    if len(body) < len(pairs):
        seen: set[str] = set()
        for name, _value in pairs:
            if name in seen:
                raise NameRepeated(name)
            seen.add(name)
    return body


def _json(request: IRequest, body: Any, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(body, indent=1, sort_keys=True).encode("utf-8") + b"\n"


def _refused(request: IRequest, refusal: Refused) -> bytes:
    status = STATUS.get(refusal.code, 400)
    return _json(request, {"error": refusal.code, "message": refusal.reason}, status)


def _page(request: IRequest) -> tuple[int, int]:
    """``?offset=`` and ``?limit=`` of a list request (``PAGE_ROWS`` at most)."""
    try:
        offset = int(request.args.get(b"offset", [b"0"])[0])
        limit = int(request.args.get(b"limit", [str(PAGE_ROWS).encode()])[0])
    except ValueError:
        offset = limit = -1
    if offset < 0 or not 1 <= limit <= PAGE_ROWS:
        raise ApiError("bad-request", f"offset must be 0 or more and limit from 1 to {PAGE_ROWS}")
    return offset, limit


def _listed(request: IRequest, name: str, rows: list[Any], row: Callable[[Any], Any]) -> bytes:
    """One page of a list: at most ``PAGE_ROWS`` rows (each made by ``row``), how
    many there are, and the offset of the next page (null at the end).  With
    thousands of tunnels one answer of all of them held up every tunnel."""
    offset, limit = _page(request)
    end = offset + limit
    return _json(
        request,
        {
            name: [row(item) for item in rows[offset:end]],
            "total": len(rows),
            "next_offset": end if end < len(rows) else None,
        },
    )


class Api:
    """Klein routes for ``/api/v1``; each checks who asks, then calls the backend."""

    app = Klein()

    def __init__(self, backend: Backend, viewer: Callable[[IRequest], Awaitable[Viewer | None]]):
        self.backend = backend
        self._viewer = viewer
        self._routes = routes_without_fallback(self.app.url_map)

    async def _who(self, request: IRequest, changing: bool = False) -> Viewer:
        viewer = await self._viewer(request)
        if viewer is None:
            raise ApiError("unauthenticated", "log in or send Authorization: Bearer TOKEN")
        if changing and not viewer.csrf_ok(request.getHeader(CSRF_HEADER)):
            raise ApiError("csrf", "browser sessions must send the X-CSRF-Token header")
        return viewer

    async def _subject(self, request: IRequest, viewer: Viewer) -> Member | None:
        """Whose data: the viewer's; admins may ask ``?member=NAME`` or ``?member=*``."""
        wanted = request.args.get(b"member", [b""])[0].decode("utf-8", "replace")
        if not wanted or wanted == viewer.member.name:
            return viewer.member
        if not viewer.member.is_admin:
            raise ApiError("forbidden", "only admins can see other members' data")
        if wanted == "*":
            return None
        member = await self.backend.store.call(self.backend.store.store.get_member, wanted)
        if member is None:
            raise ApiError("no-such-member", f"there is no member named {wanted!r}")
        return member

    @staticmethod
    def _body(request: IRequest) -> dict[str, Any]:
        try:
            body = json.loads(request.content.read() or b"{}", object_pairs_hook=_no_repeats)
        except NameRepeated as repeated:
            raise ApiError(
                "bad-json", f"the request body names {repeated.args[0]!r} more than once"
            ) from None
        except (ValueError, UnicodeDecodeError):
            raise ApiError("bad-json", "the request body must be a JSON object") from None
        except RecursionError:
            raise ApiError("bad-json", "the request body is nested too deeply") from None
        if not isinstance(body, dict):
            raise ApiError("bad-json", "the request body must be a JSON object")
        problem = json_problem(body)
        if problem == "too-deep":
            raise ApiError("bad-json", "the request body is nested too deeply")
        if problem == "bad-text":
            raise ApiError(
                "bad-text", "text must be valid Unicode (a lone surrogate such as \\ud800 is not)"
            )
        return body

    @app.handle_errors(ApiError)
    def api_error(self, request: IRequest, failure: Any) -> bytes:
        error = failure.value
        return _refused(request, Refused(error.code, error.message))

    @app.handle_errors(sqlite3.Error)
    def store_failed(self, request: IRequest, failure: Any) -> bytes:
        log_store_failure(request, failure.value)
        return _refused(request, STORE_FAILED)

    # -- keys ------------------------------------------------------------------------------

    @app.route("/keys", methods=["GET"])
    async def list_keys(self, request: IRequest) -> bytes:
        viewer = await self._who(request)
        subject = await self._subject(request, viewer)
        if subject is None:
            keys = await self.backend.store.call(self.backend.store.store.list_keys)
        else:
            keys = await self.backend.keys(subject)
        return _listed(request, "keys", keys, key_row)

    @app.route("/keys", methods=["POST"])
    async def add_key(self, request: IRequest) -> bytes:
        viewer = await self._who(request, changing=True)
        body = self._body(request)
        text, description = body.get("public_key"), body.get("description", "")
        if not isinstance(text, str) or not isinstance(description, str):
            raise ApiError("bad-request", "public_key (and description) must be strings")
        result = await self.backend.add_key(viewer.member, text, description.strip())
        if isinstance(result, Refused):
            return _refused(request, result)
        return _json(request, key_row(result), 201)

    @app.route("/keys/<path:fingerprint>", methods=["DELETE"])
    async def remove_key(self, request: IRequest, fingerprint: str) -> bytes:
        viewer = await self._who(request, changing=True)
        result = await self.backend.remove_key(viewer.member, unquote(fingerprint))
        if isinstance(result, Refused):
            return _refused(request, result)
        assert isinstance(result, KeyRecord)
        return _json(request, {"removed": key_row(result)})

    # -- ports -----------------------------------------------------------------------------

    @app.route("/ports", methods=["GET"])
    async def list_ports(self, request: IRequest) -> bytes:
        viewer = await self._who(request)
        subject = await self._subject(request, viewer)
        return self._ports(request, await self.backend.ports(subject))

    def _ports(self, request: IRequest, ports: list[RegisteredPort]) -> bytes:
        """A page of registered ports, each with its live state."""
        state = self.backend.port_states
        return _listed(request, "ports", ports, lambda port: port_row(*state([port])[0]))

    @app.route("/ports", methods=["POST"])
    async def add_port(self, request: IRequest) -> bytes:
        viewer = await self._who(request, changing=True)
        body = self._body(request)
        port, description = body.get("port"), body.get("description", "")
        if isinstance(port, bool) or not isinstance(port, int) or not isinstance(description, str):
            raise ApiError("bad-request", "port must be a number and description a string")
        result = await self.backend.add_port(viewer.member, port, description)
        if isinstance(result, Refused):
            return _refused(request, result)
        return _json(request, port_row(result), 201)

    @app.route("/ports/<int:port>", methods=["DELETE"])
    async def remove_port(self, request: IRequest, port: int) -> bytes:
        """Forget a registration: the viewer's; admins ``?member=NAME`` or ``?member=*``."""
        viewer = await self._who(request, changing=True)
        subject = await self._subject(request, viewer)
        owner = "*" if subject is None else subject.name
        result = await self.backend.remove_port(viewer.member, port, owner)
        if isinstance(result, Refused):
            return _refused(request, result)
        assert isinstance(result, RegisteredPort)
        return _json(request, {"removed": port_row(result)})

    # -- live and read-only ----------------------------------------------------------------

    @app.route("/tunnels", methods=["GET"])
    async def tunnels(self, request: IRequest) -> bytes:
        viewer = await self._who(request)
        subject = await self._subject(request, viewer)
        forwards = self.backend.live_forwards(subject)
        return _listed(request, "tunnels", forwards, lambda forward: tunnel_rows([forward])[0])

    @app.route("/connect", methods=["GET"])
    async def connect(self, request: IRequest) -> bytes:
        viewer = await self._who(request)
        info = await self.backend.connect_info(viewer.member)
        return _json(
            request, {**info.as_dict(), "host_key_fingerprint": self.backend.host_key_fingerprint}
        )

    @app.route("/directory", methods=["GET"])
    async def directory(self, request: IRequest) -> bytes:
        await self._who(request)
        return self._ports(request, await self.backend.directory())

    @app.route("/check/<int:port>", methods=["GET"])
    async def check(self, request: IRequest, port: int) -> bytes:
        viewer = await self._who(request)
        address = getattr(request.getClientAddress(), "host", "unknown")
        result = await self.backend.check(viewer.member, port, address)
        if isinstance(result, Refused):
            return _refused(request, result)
        return _json(request, result.as_dict())

    @app.route("/openapi.json", methods=["GET"])
    def openapi(self, request: IRequest) -> bytes:
        return _json(request, openapi_document())

    @app.route("/", branch=True)
    def not_found(self, request: IRequest) -> bytes:
        path = request.path.decode("utf-8", "replace").removeprefix(API_PREFIX) or "/"
        allowed = self._routes.bind("api").allowed_methods(path)
        if allowed:
            methods = ", ".join(sorted(allowed))
            request.setHeader(b"allow", methods.encode("ascii"))
            method = request.method.decode("ascii", "replace")
            reason = f"{path} takes {methods}, not {method}"
            return _refused(request, Refused("method-not-allowed", reason))
        return _refused(request, Refused("not-found", "no such API path; see /api/v1/openapi.json"))


def routes_without_fallback(routes: Map) -> Map:
    """The API's routes less the catch-all, to tell a wrong method from a wrong path."""
    return Map(
        [
            Rule(rule.rule, methods=rule.methods, endpoint=rule.endpoint)
            for rule in routes.iter_rules()
            if rule.methods is not None
        ]
    )


#: Deeper JSON than any request of ours needs is refused (a body of 64 KiB
#: can nest thousands deep, and Python's recursion runs out in the thousand).
MAX_JSON_DEPTH = 32


def json_problem(value: Any, max_depth: int = MAX_JSON_DEPTH) -> str | None:
    """What makes a parsed JSON value unusable: ``"too-deep"`` (nested beyond
    ``max_depth``), ``"bad-text"`` (a string that is not valid Unicode, such as
    a lone surrogate from ``"\\ud800"``, which SQLite refuses); None if nothing.

    Walks without recursion, so no depth can raise ``RecursionError`` here."""
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "bad-text"
        elif isinstance(item, dict | list):
            if depth > max_depth:
                return "too-deep"
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            pending.extend((child, depth + 1) for child in children)
    return None
