"""The HTML dashboard: login, the Jumphost Tunnel section, the directory."""

from __future__ import annotations

import functools
import hashlib
import hmac
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from klein import Klein
from twisted.web.iweb import IRequest
from twisted.web.pages import notFound
from twisted.web.resource import Resource
from twisted.web.static import File

from nekojump.keys import safe_to_echo
from nekojump.metrics import Metrics
from nekojump.model import Member, Refused
from nekojump.policy import ForwardRules, port_refusal, source_allowed
from nekojump.web.api import Api
from nekojump.web.auth import (
    SESSION_LIFETIME,
    Viewer,
    bearer_token,
    clear_session_cookie,
    session_cookie,
    set_session_cookie,
)
from nekojump.web.backend import STORE_FAILED, Backend, log_store_failure
from nekojump.web.render import Renderer
from nekojump.web.views import tunnel_rows

SECURITY_HEADERS = {
    b"content-security-policy": (
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    b"x-content-type-options": b"nosniff",
    b"x-frame-options": b"DENY",
    # Same-origin requests carry the page's origin: over plain HTTP at a name
    # that is not localhost, browsers send no Sec-Fetch-Site, and with
    # no-referrer the dashboard's own forms said "Origin: null" (``from_this_site``).
    b"referrer-policy": b"same-origin",
    b"cache-control": b"no-store",
}


def form(request: IRequest, name: str) -> str:
    values = request.args.get(name.encode("ascii"), [b""])
    return values[0].decode("utf-8", "replace")


STALE_FORM = (
    "This page was older than your session (you logged in again since), so nothing "
    "was changed: check and send it again."
)
SESSION_ENDED = "Your session ended, so nothing was changed. Log in and try again."

#: What Live tunnels suggests when there are none, with and without a key saved.
TUNNELS_HINT = {
    True: "Run the ssh -N -R command from How to Connect on the machine with the service",
    False: "Save a key first, then run ssh -N -R from that machine",
}

#: The member guide's suggested ports (the seed's table): service, port.
SUGGESTED_PORTS = (
    ("Web (HTTP)", 10080),
    ("Web (alt)", 18080),
    ("SSH", 10022),
    ("IRC", 16667),
)


def suggested_ports(rules: ForwardRules) -> list[tuple[str, int, bool]]:
    """The suggested ports, each with whether this jumphost allows it (its
    range or reserved ports may leave some out)."""
    return [(service, port, port_refusal(port, rules) is None) for service, port in SUGGESTED_PORTS]


#: What the page says after a form did something it shows no other way
#: (``/?done=CODE``; unknown codes say nothing), and the card it shows in
#: (``notice``: the SSH Public Key card; ``port_notice``: Registered Ports).
NOTICES = {
    b"key-added": ("notice", "Key saved. How to Connect below has your commands."),
    b"key-removed": ("notice", "Key removed. Tunnels that used it were closed."),
    b"port-registered": (
        "port_notice",
        "Port registered: other members find it in the Service Directory.",
    ),
    b"port-removed": ("port_notice", "Registration removed."),
}


#: Pages besides the dashboard a login may return to (``/login?next=...``):
#: any other ``next`` is ignored, so a link cannot send a member elsewhere.
AFTER_LOGIN = {"/admin": b"/admin", "/directory": b"/directory"}


def login_url(after: str, expired: bool = False) -> bytes:
    """The login page, saying the session ended if ``expired``, that returns to ``after``."""
    query = [b"expired=1"] if expired else []
    if after in AFTER_LOGIN:
        query.append(b"next=" + AFTER_LOGIN[after])
    return b"/login" + (b"?" + b"&".join(query) if query else b"")


def see_other(request: IRequest, location: bytes) -> bytes:
    """Answer a form post with 303, so reloading the next page never re-posts."""
    request.setResponseCode(303)
    request.setHeader(b"location", location)
    return b""


def form_post(
    handler: Callable[[Dashboard, IRequest, Viewer], Awaitable[bytes]],
) -> Callable[[Dashboard, IRequest], Awaitable[bytes]]:
    """A form post's handler gets the member behind the session, with a valid CSRF token;
    anyone else gets sent to log in (no session) or a 403 (stale or forged form)."""

    @functools.wraps(handler)
    async def checked(self: Dashboard, request: IRequest) -> bytes:
        viewer = await self.viewer(request)
        if viewer is None:
            # The session ended while the page was open: the login page says
            # that nothing was changed, and returns to the page the form was on.
            return see_other(request, login_url(form(request, "back"), expired=True))
        if not viewer.csrf_ok(form(request, "csrf")):
            request.setResponseCode(403)
            return await self._stale_form(request, viewer)
        try:
            return await handler(self, request, viewer)
        except sqlite3.Error as error:
            # Not saved (a full or failing disk): the form comes back with what
            # was typed, saying so, as for a stale form.
            log_store_failure(request, error)
            request.setResponseCode(503)
            return await self._stale_form(request, viewer, STORE_FAILED.reason)

    return checked


#: A refused login's status, when it is not a 401.
LOGIN_STATUS = {"login-throttled": 429, STORE_FAILED.code: 503}

FOREIGN_LOGIN = (
    "this login form was sent from another site; open the dashboard's own login page "
    "and log in there"
)


#: The port an ``Origin`` leaves out, and a ``Host`` header may still name.
DEFAULT_PORTS = {b"http": b":80", b"https": b":443"}


#: Services one page of the Service Directory lists (``?offset=`` for the next).
DIRECTORY_ROWS = 500

#: The most rows of each list (live tunnels, keys, registered ports) /admin shows;
#: ``?member=NAME`` shows one member's.
ADMIN_ROWS = 500


def _admin_back(request: IRequest, viewer: Viewer) -> str | None:
    """For a form an admin sent from /admin: the member that page showed alone
    ("" for everyone), so the answer goes back to the same view; else None."""
    back = urlsplit(form(request, "back"))
    if back.path != "/admin" or not viewer.member.is_admin:
        return None
    return parse_qs(back.query).get("member", [""])[0].strip()[:64]


def _admin_url(member: str, anchor: str = "") -> bytes:
    """/admin, showing ``member`` alone if one is named."""
    query = f"?member={quote(member, safe='')}" if member else ""
    return f"/admin{query}{anchor}".encode("ascii")


def _member_filter(request: IRequest) -> str:
    """The member name /admin was asked to show alone (``?member=``), or ""."""
    return request.args.get(b"member", [b""])[0].decode("utf-8", "replace").strip()[:64]


def _after_login(page: str) -> str:
    """``page`` if a login may return to it, else "" (the dashboard)."""
    return page if page in AFTER_LOGIN else ""


def echoable(text: str) -> str:
    """``text`` to show back in a form, or nothing if it holds private key material."""
    return text if safe_to_echo(text) else ""


def check_token(viewer: Viewer, port: str) -> str:
    """What a Check's result address carries: made from the session's CSRF
    token, so only the page's own Check button leads there (another page
    could otherwise have the browser run Checks with a link or an image)."""
    secret = (viewer.csrf or "").encode("utf-8")
    digest = hmac.new(secret, b"check\0" + port.encode("utf-8"), hashlib.sha256)
    return digest.hexdigest()[:32]


def from_this_site(request: IRequest) -> bool:
    """False if a browser says the request comes from a page of another origin.

    The login form has no CSRF token (there is no session yet), so another
    site, even a member's service on this host's own address (the same
    *site* to a browser: ports do not count), could log the browser in to an
    account of its choosing.  Browsers say where a form came from in
    ``Sec-Fetch-Site`` (anything but ``same-origin``, or ``none`` for a
    typed address, is someone else's page), and older ones in ``Origin``,
    checked against ``Host``.  Clients that send neither (scripts) are not
    browsers and pass."""
    fetch_site = request.getHeader(b"sec-fetch-site")
    if fetch_site is not None:
        return fetch_site.strip().lower() in (b"same-origin", b"none")
    origin = request.getHeader(b"origin")
    if origin is None:
        return True
    scheme, _, origin_host = origin.strip().lower().partition(b"://")
    default = DEFAULT_PORTS.get(scheme, b"")
    host = (request.getHeader(b"host") or b"").strip().lower()
    return origin_host.removesuffix(default) == host.removesuffix(default)


class StaticFiles(File):
    """The stylesheet and script: files only, no directory listings."""

    def directoryListing(self) -> Resource:
        return notFound()


def peer(request: IRequest) -> str:
    return getattr(request.getClientAddress(), "host", "unknown")


class Dashboard:
    """Klein routes for people with browsers; ``/api/v1`` is delegated to ``Api``."""

    app = Klein()

    def __init__(self, backend: Backend, renderer: Renderer | None = None):
        self.backend = backend
        self.renderer = renderer or Renderer()
        self.api = Api(backend, self.viewer)

    def resource(self) -> Resource:
        return SecureHeaders(self.app.resource(), self.backend.metrics)

    async def viewer(self, request: IRequest) -> Viewer | None:
        """The member behind the session cookie or bearer token, if any."""
        token = bearer_token(request)
        if token is not None:
            return await self.backend.viewer_from_token(token)
        cookie = session_cookie(request)
        viewer = await self.backend.viewer_from_session(cookie) if cookie else None
        sso_name = self._sso_name(request)
        if sso_name is not None and (viewer is None or viewer.member.name != sso_name):
            # The proxy says who this is, on every request: no session is stored.
            viewer = await self.backend.viewer_from_sso(sso_name, peer(request))
        return viewer

    def _sso_name(self, request: IRequest) -> str | None:
        """The member a trusted reverse proxy names in the SSO header, if any."""
        web = self.backend.config.web
        if not web.sso_header or not source_allowed(peer(request), web.trusted_proxies):
            return None
        value = request.getHeader(web.sso_header.encode("ascii"))
        return value.decode("utf-8", "replace").strip() if value else None

    # -- login ---------------------------------------------------------------------------

    @app.route("/login", methods=["GET"])
    def login_page(self, request: IRequest) -> bytes:
        notice = SESSION_ENDED if request.args.get(b"expired") else None
        after = request.args.get(b"next", [b""])[0].decode("utf-8", "replace")
        return self.renderer.page(
            "login.html", error=None, name="", notice=notice, after=_after_login(after)
        )

    @app.route("/login", methods=["POST"])
    async def login(self, request: IRequest) -> bytes | None:
        name = form(request, "name").strip()
        after = _after_login(form(request, "next"))
        if not from_this_site(request):
            request.setResponseCode(403)
            return self.renderer.page(
                "login.html", error=FOREIGN_LOGIN, name="", notice=None, after=after
            )
        try:
            result = await self.backend.login(name, form(request, "password"), peer(request))
        except sqlite3.Error as error:  # a session (or the audit) could not be stored
            log_store_failure(request, error)
            result = STORE_FAILED
        if isinstance(result, Refused):
            request.setResponseCode(LOGIN_STATUS.get(result.code, 401))
            return self.renderer.page(
                "login.html", error=result.reason, name=name[:64], notice=None, after=after
            )
        set_session_cookie(request, result, SESSION_LIFETIME)
        return see_other(request, AFTER_LOGIN.get(after, b"/"))

    @app.route("/logout", methods=["POST"])
    async def logout(self, request: IRequest) -> bytes:
        # The session ended is the one this browser's cookie names, also from
        # a page left open since an earlier session (its CSRF token is stale:
        # the cookie must not be cleared with the session left running).  A
        # post from another page, even a member's service on another port of
        # this host, which a browser sends the SameSite cookie with, does nothing.
        viewer = await self.viewer(request)
        if viewer is not None and not (
            from_this_site(request) or viewer.csrf_ok(form(request, "csrf"))
        ):
            request.setResponseCode(403)
            return b"forbidden: log out from the dashboard's own page"
        if viewer is not None and viewer.token:
            await self.backend.logout(viewer.token)
        clear_session_cookie(request)
        return see_other(request, b"/login")

    # -- the Jumphost Tunnel section -------------------------------------------------------

    @app.route("/", methods=["GET"])
    async def dashboard(self, request: IRequest) -> bytes:
        viewer = await self.viewer(request)
        if viewer is None:
            return see_other(request, b"/login")
        done = NOTICES.get(request.args.get(b"done", [b""])[0])
        notice = {done[0]: done[1]} if done else {}
        if "port_notice" in notice and not await self._has_ports_card(viewer):
            # The last port went with no key left: no Registered Ports card to say it in.
            notice = {"notice": notice["port_notice"]}
        port = request.args.get(b"check")
        token = request.args.get(b"token", [b""])[0]
        text = port[0].decode("utf-8", "replace")[:20] if port else ""
        if port is None or not hmac.compare_digest(token, check_token(viewer, text).encode()):
            # No Check, or one this page's own Check button did not ask for (a
            # link or an <img> elsewhere): the page without it.
            return await self._page(viewer, **notice)
        # A Check's result: its own address, so Back and reload show it again
        # instead of asking to send the form again.
        result = await self.backend.check(viewer.member, text, peer(request))
        if isinstance(result, Refused):
            request.setResponseCode(404)
            shown = await self._has_ports_card(viewer)
            return await self._page(
                viewer, port_error=result.reason, notice=None if shown else result.reason
            )
        return await self._page(viewer, check=result)

    async def _has_ports_card(self, viewer: Viewer) -> bool:
        member = viewer.member
        return bool(await self.backend.keys(member) or await self.backend.ports(member))

    async def _stale_form(self, request: IRequest, viewer: Viewer, said: str = STALE_FORM) -> bytes:
        """A form from a page older than the session (a log out and in since,
        in another tab), or one the database could not store: nothing is
        changed, and the page comes back with a fresh token and what was typed,
        to send again, and ``said`` in the form's card."""
        if (member := _admin_back(request, viewer)) is not None:
            return await self._admin_page(viewer, notice=said, member=member)
        if request.path == b"/keys":
            text, description = form(request, "public_key"), form(request, "description")
            return await self._page(
                viewer,
                key_error=said,
                key_text=echoable(text),
                key_description=echoable(description),
            )
        if request.path == b"/ports":
            return await self._page(
                viewer,
                port_error=said,
                # The ports card (where port_error shows) needs a key or a port.
                notice=None if await self._has_ports_card(viewer) else said,
                port_value=form(request, "port").strip(),
                port_description=echoable(form(request, "description")),
            )
        return await self._page(viewer, notice=said)

    async def _page(self, viewer: Viewer, **extra: Any) -> bytes:
        member = viewer.member
        keys = await self.backend.keys(member)
        ports = await self.backend.ports(member)
        context = {
            "member": member,
            "csrf": viewer.csrf,
            "keys": keys,
            "ports": self.backend.port_states(ports),
            "tunnels": self.backend.tunnels(member),
            "hint": TUNNELS_HINT[bool(keys)],
            "suggested_ports": suggested_ports(self.backend.config.forwarding.rules),
            "connect": await self.backend.connect_info(member) if keys else None,
            "host_key_fingerprint": self.backend.host_key_fingerprint,
            "rules": self.backend.config.forwarding.rules,
            "mesh_address": self.backend.config.forwarding.bind_address,
            "key_error": None,
            "key_text": "",
            "key_description": "",
            "port_error": None,
            "port_value": "",
            "port_description": "",
            "notice": None,
            "port_notice": None,
            "check": None,
        }
        context.update(extra)
        return self.renderer.page("dashboard.html", **context)

    @app.route("/keys", methods=["POST"])
    @form_post
    async def add_key(self, request: IRequest, viewer: Viewer) -> bytes:
        text, description = form(request, "public_key"), form(request, "description").strip()
        result = await self.backend.add_key(viewer.member, text, description)
        if isinstance(result, Refused):
            request.setResponseCode(400)
            # Private key material is never echoed back into the page.
            return await self._page(
                viewer,
                key_error=result.reason,
                key_text=text if safe_to_echo(text) else "",
                key_description=description if safe_to_echo(description) else "",
            )
        return see_other(request, b"/?done=key-added#ssh-key-card")

    @app.route("/keys/remove", methods=["POST"])
    @form_post
    async def remove_key(self, request: IRequest, viewer: Viewer) -> bytes:
        result = await self.backend.remove_key(viewer.member, form(request, "fingerprint"))
        if isinstance(result, Refused):
            return await self._nothing_removed(request, viewer, result, "notice")
        if (member := _admin_back(request, viewer)) is not None:
            return see_other(request, _admin_url(member))
        return see_other(request, b"/?done=key-removed#ssh-key-card")

    @app.route("/ports", methods=["POST"])
    @form_post
    async def add_port(self, request: IRequest, viewer: Viewer) -> bytes:
        port, description = form(request, "port").strip(), form(request, "description")
        result = await self.backend.add_port(viewer.member, port, description)
        if isinstance(result, Refused):
            request.setResponseCode(400)
            return await self._page(
                viewer,
                port_error=result.reason,
                port_value=port,
                port_description=echoable(description),
            )
        return see_other(request, b"/?done=port-registered#ports-card")

    @app.route("/ports/remove", methods=["POST"])
    @form_post
    async def remove_port(self, request: IRequest, viewer: Viewer) -> bytes:
        owner = form(request, "member") or None
        result = await self.backend.remove_port(viewer.member, form(request, "port"), owner)
        if isinstance(result, Refused):
            return await self._nothing_removed(request, viewer, result, "port_notice")
        if (member := _admin_back(request, viewer)) is not None:
            return see_other(request, _admin_url(member, "#admin-ports-card"))
        return see_other(request, b"/?done=port-removed#ports-card")

    async def _nothing_removed(
        self, request: IRequest, viewer: Viewer, refused: Refused, card: str
    ) -> bytes:
        """A removal refused, mostly because it is gone already (removed in another
        tab, by an admin or the CLI): the page it was asked from, saying so in
        ``card``'s notice, with no form marked as if it held a mistake."""
        request.setResponseCode(404)
        said = f"Nothing removed: {refused.reason}."
        if (member := _admin_back(request, viewer)) is not None:
            return await self._admin_page(viewer, notice=said, member=member)
        if card == "port_notice" and not await self._has_ports_card(viewer):
            card = "notice"  # no Registered Ports card to say it in
        return await self._page(viewer, **{card: said})

    @app.route("/check", methods=["POST"])
    @form_post
    async def check(self, request: IRequest, viewer: Viewer) -> bytes:
        port = form(request, "port").strip()[:20]
        token = check_token(viewer, port)
        location = f"/?check={quote(port, safe='')}&token={token}#check-card"
        return see_other(request, location.encode("ascii"))

    @app.route("/tunnels", methods=["GET"])
    async def tunnels_fragment(self, request: IRequest) -> bytes:
        """The Live tunnels table alone, for the page's refresh without a reload."""
        viewer = await self.viewer(request)
        if viewer is None:
            request.setResponseCode(401)
            return b""
        member = viewer.member
        keys = await self.backend.keys(member)
        return self.renderer.page(
            "tunnels.html",
            tunnels=self.backend.tunnels(member),
            csrf=viewer.csrf,
            hint=TUNNELS_HINT[bool(keys)],
            ports=self.backend.port_states(await self.backend.ports(member)),
            keys=keys,
        )

    @app.route("/directory", methods=["GET"])
    async def directory(self, request: IRequest) -> bytes:
        viewer = await self.viewer(request)
        if viewer is None:
            return see_other(request, login_url("/directory"))
        ports = await self.backend.directory()
        try:
            offset = max(0, int(request.args.get(b"offset", [b"0"])[0]))
        except ValueError:
            offset = 0
        offset = min(offset, max(0, len(ports) - 1)) // DIRECTORY_ROWS * DIRECTORY_ROWS
        return self.renderer.page(
            "directory.html",
            member=viewer.member,
            csrf=viewer.csrf,
            ports=self.backend.port_states(ports[offset : offset + DIRECTORY_ROWS]),
            offset=offset,
            total=len(ports),
            per_page=DIRECTORY_ROWS,
            mesh_address=self.backend.config.forwarding.bind_address,
            hostname=self.backend.config.web.public_hostname,
        )

    @app.route("/admin", methods=["GET"])
    async def admin(self, request: IRequest) -> bytes:
        viewer = await self.viewer(request)
        if viewer is None:
            return see_other(request, login_url("/admin"))
        if not viewer.member.is_admin:
            request.setResponseCode(403)
            return b"admins only"
        return await self._admin_page(viewer, member=_member_filter(request))

    @app.route("/admin/tunnels", methods=["GET"])
    async def admin_tunnels_fragment(self, request: IRequest) -> bytes:
        """The admin page's Live tunnels table alone, for its refresh without a reload."""
        viewer = await self.viewer(request)
        if viewer is None:
            request.setResponseCode(401)
            return b""
        if not viewer.member.is_admin:
            request.setResponseCode(403)
            return b"admins only"
        lists = await self._admin_lists(_member_filter(request))
        return self.renderer.page("admin_tunnels.html", **lists)

    async def _admin_lists(self, member: str) -> dict[str, Any]:
        """What /admin lists: everyone's live tunnels, keys and registered ports, or
        one member's; at most ``ADMIN_ROWS`` of each, with how many there are.

        With thousands of tunnels a page of all of them took most of a second to
        render, every 2 s per open admin tab, while every tunnel waited."""
        backend = self.backend
        store = backend.store
        found = None
        if member:
            # One member's lists are bounded by the per-member limits: shown whole.
            found = await store.call(store.store.get_member, member)
            keys = await store.call(store.store.list_keys, member) if found else []
            ports = await backend.ports(found) if found else []
            live = backend.registry.forwards_of_member(found.id) if found else []
            rows = None
        else:
            keys = await store.call(store.store.list_keys)
            ports = await backend.ports(None)
            live = backend.registry.forwards()
            rows = ADMIN_ROWS
        return {
            "member_filter": member,
            "member_found": found is not None,
            "keys": keys[:rows],
            "keys_total": len(keys),
            "ports": backend.port_states(ports[:rows]),
            "ports_total": len(ports),
            "tunnels": tunnel_rows(live[:rows]),
            "tunnels_total": len(live),
        }

    async def _admin_page(
        self, viewer: Viewer, notice: str | None = None, member: str = ""
    ) -> bytes:
        events = await self.backend.store.call(self.backend.store.store.audit_events, 100)
        return self.renderer.page(
            "admin.html",
            member=viewer.member,
            csrf=viewer.csrf,
            events=events,
            notice=notice,
            limit=ADMIN_ROWS,
            **await self._admin_lists(member),
        )

    # -- API and static files ----------------------------------------------------------------

    @app.route("/api/v1/", branch=True)
    def api_branch(self, request: IRequest) -> Resource:
        return self.api.app.resource()

    @app.route("/static/", branch=True)
    def static(self, request: IRequest) -> Resource:
        return StaticFiles(str(self.renderer.static_dir))


class SecureHeaders(Resource):
    """Adds CSP and friends to every response of the wrapped (Klein) resource."""

    isLeaf = True

    def __init__(self, wrapped: Resource, metrics: Metrics):
        super().__init__()
        self.wrapped = wrapped
        self.metrics = metrics

    def render(self, request: IRequest) -> Any:
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        request.notifyFinish().addBoth(self._count, request)
        return self.wrapped.render(request)

    def _count(self, _result: object, request: IRequest) -> None:
        self.metrics.web_requests.labels(f"{request.code // 100}xx").inc()


def member_label(member: Member) -> str:
    return f"{member.name} ({member.tier})"
