"""The OpenAPI 3 description of ``/api/v1`` (tests check it against the routes)."""

from __future__ import annotations

from typing import Any

from nekojump import __version__


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _ok(description: str, schema: dict[str, Any], status: str = "200") -> dict[str, Any]:
    return {
        status: {"description": description, "content": {"application/json": {"schema": schema}}}
    }


def _list_of(name: str, ref: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": [name],
        "properties": {
            name: {"type": "array", "items": {"$ref": ref}},
            "total": {"type": "integer", "description": "rows in the whole list"},
            "next_offset": {
                "type": "integer",
                "nullable": True,
                "description": "the offset of the next page, or null at the end",
            },
        },
    }


MEMBER_PARAMETER = {
    "name": "member",
    "in": "query",
    "required": False,
    "description": "admins only: another member's name, or * for everyone",
    "schema": {"type": "string"},
}
#: The most rows one answer of a list holds (``api.PAGE_ROWS``).
PAGE_ROWS = 1000
PAGE_PARAMETERS = [
    {
        "name": "offset",
        "in": "query",
        "required": False,
        "description": "rows to skip: the next_offset of the answer before",
        "schema": {"type": "integer", "minimum": 0, "default": 0},
    },
    {
        "name": "limit",
        "in": "query",
        "required": False,
        "description": "rows to answer at most (total and next_offset say what is left)",
        "schema": {"type": "integer", "minimum": 1, "maximum": PAGE_ROWS, "default": PAGE_ROWS},
    },
]
UNAUTHENTICATED = {"401": _error("no valid session or bearer token")}
#: What a paged list answers besides its page.
PAGED_ERRORS = {
    "400": _error("offset below 0, or limit not from 1 to 1000 (bad-request)"),
    **UNAUTHENTICATED,
}
CHANGE_ERRORS = {**UNAUTHENTICATED, "403": _error("CSRF token missing (browser sessions)")}


def openapi_document() -> dict[str, Any]:
    """The API as OpenAPI 3.0."""
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "nekojump API",
            "version": __version__,
            "description": "Manage your SSH keys and registered ports; see your live tunnels.",
        },
        "servers": [{"url": "/api/v1"}],
        "security": [{"bearer": []}, {"session": []}],
        "paths": {
            "/keys": {
                "get": {
                    "summary": "List your SSH public keys",
                    "parameters": [MEMBER_PARAMETER, *PAGE_PARAMETERS],
                    "responses": {
                        **_ok("keys", _list_of("keys", "#/components/schemas/Key")),
                        **PAGED_ERRORS,
                    },
                },
                "post": {
                    "summary": "Add an SSH public key (paste the .pub file)",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/NewKey"}}
                        },
                    },
                    "responses": {
                        **_ok("the stored key", {"$ref": "#/components/schemas/Key"}, "201"),
                        "400": _error("not a usable public key (see message)"),
                        "409": _error("key already registered"),
                        **CHANGE_ERRORS,
                    },
                },
            },
            "/keys/{fingerprint}": {
                "delete": {
                    "summary": "Remove a key; its live SSH sessions end within a second",
                    "parameters": [
                        {
                            "name": "fingerprint",
                            "in": "path",
                            "required": True,
                            "description": "SHA256:... as ssh-keygen -l prints it",
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {
                        **_ok("removed", {"type": "object"}),
                        "404": _error("no such key of yours"),
                        **CHANGE_ERRORS,
                    },
                },
            },
            "/ports": {
                "get": {
                    "summary": "List your registered ports",
                    "parameters": [MEMBER_PARAMETER, *PAGE_PARAMETERS],
                    "responses": {
                        **_ok("ports", _list_of("ports", "#/components/schemas/Port")),
                        **PAGED_ERRORS,
                    },
                },
                "post": {
                    "summary": "Register a port (inventory only; tunnels are not affected)",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/NewPort"}}
                        },
                    },
                    "responses": {
                        **_ok("registered", {"$ref": "#/components/schemas/Port"}, "201"),
                        "400": _error("port outside the range or reserved"),
                        "409": _error(
                            "port registered by someone, or served by another member's tunnel"
                        ),
                        **CHANGE_ERRORS,
                    },
                },
            },
            "/ports/{port}": {
                "delete": {
                    "summary": "Forget one of your registered ports (admins: anyone's)",
                    "parameters": [
                        {
                            "name": "port",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "integer"},
                        },
                        MEMBER_PARAMETER,
                    ],
                    "responses": {
                        **_ok("removed", {"type": "object"}),
                        "404": _error("not your registered port"),
                        **CHANGE_ERRORS,
                    },
                },
            },
            "/tunnels": {
                "get": {
                    "summary": "Your live forwards now",
                    "parameters": [MEMBER_PARAMETER, *PAGE_PARAMETERS],
                    "responses": {
                        **_ok("tunnels", _list_of("tunnels", "#/components/schemas/Tunnel")),
                        **PAGED_ERRORS,
                    },
                },
            },
            "/connect": {
                "get": {
                    "summary": "Ready-made ssh, autossh, systemd and ssh_config text",
                    "responses": {**_ok("commands", {"type": "object"}), **UNAUTHENTICATED},
                },
            },
            "/directory": {
                "get": {
                    "summary": "Every member's registered ports, with live state",
                    "parameters": PAGE_PARAMETERS,
                    "responses": {
                        **_ok("ports", _list_of("ports", "#/components/schemas/Port")),
                        **PAGED_ERRORS,
                    },
                },
            },
            "/check/{port}": {
                "get": {
                    "summary": "Troubleshoot one of your ports: is a tunnel up, does your local "
                    "service answer, can you reach the jumphost from where you are?",
                    "parameters": [
                        {
                            "name": "port",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "integer"},
                        }
                    ],
                    "responses": {
                        **_ok("diagnosis", {"$ref": "#/components/schemas/Check"}),
                        "404": _error("not your port"),
                        **UNAUTHENTICATED,
                    },
                },
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "security": [],
                    "responses": _ok("OpenAPI document", {"type": "object"}),
                },
            },
        },
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "nekojump-admin token create NAME",
                },
                "session": {"type": "apiKey", "in": "cookie", "name": "nekojump_session"},
            },
            "schemas": {
                "Check": {
                    "type": "object",
                    "required": ["case", "message", "port"],
                    "properties": {
                        "case": {
                            "type": "string",
                            "enum": ["no-tunnel", "local-service-refused", "timeout", "reachable"],
                        },
                        "message": {"type": "string"},
                        "port": {"type": "integer"},
                        "rtt_ms": {"type": "number", "nullable": True},
                        "http_status": {"type": "string", "nullable": True},
                        "last_error": {"type": "string", "nullable": True},
                        "viewer_address": {"type": "string", "nullable": True},
                        "viewer_allowed": {"type": "boolean", "nullable": True},
                    },
                },
                "Error": {
                    "type": "object",
                    "required": ["error", "message"],
                    "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
                },
                "NewKey": {
                    "type": "object",
                    "required": ["public_key"],
                    "properties": {
                        "public_key": {"type": "string"},
                        "description": {"type": "string"},
                    },
                },
                "Key": {
                    "type": "object",
                    "properties": {
                        "fingerprint": {"type": "string"},
                        "type": {"type": "string"},
                        "description": {"type": "string"},
                        "member": {"type": "string"},
                        "added_at": {"type": "number"},
                        "last_used_at": {"type": "number", "nullable": True},
                    },
                },
                "NewPort": {
                    "type": "object",
                    "required": ["port"],
                    "properties": {"port": {"type": "integer"}, "description": {"type": "string"}},
                },
                "Port": {
                    "type": "object",
                    "properties": {
                        "port": {"type": "integer"},
                        "member": {"type": "string"},
                        "description": {"type": "string"},
                        "registered_at": {"type": "number"},
                        "live": {
                            "type": "boolean",
                            "description": "the registering member's own tunnel holds the port",
                        },
                        "state": {
                            "type": "string",
                            "enum": ["up", "down", "held-by-other"],
                            "description": "held-by-other: another member's tunnel holds it",
                        },
                    },
                },
                "Tunnel": {
                    "type": "object",
                    "properties": {
                        "port": {"type": "integer"},
                        "bind_address": {"type": "string"},
                        "member": {"type": "string"},
                        "key": {"type": "string"},
                        "key_fingerprint": {"type": "string"},
                        "source": {"type": "string"},
                        "since": {"type": "number"},
                        "open_connections": {"type": "integer"},
                        "connections_total": {"type": "integer"},
                        "bytes_in": {"type": "integer"},
                        "bytes_out": {"type": "integer"},
                        "last_error": {"type": "string", "nullable": True},
                    },
                },
            },
        },
    }
