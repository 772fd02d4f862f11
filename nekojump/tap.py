"""The twistd plugin's options and ``makeService``."""

from __future__ import annotations

import gc

from twisted.application.service import IService
from twisted.python import usage

from nekojump.config import ConfigError, load_config


class Options(usage.Options):
    synopsis = "[--config FILE] [--data-dir DIR]"
    longdesc = (
        "Runs the nekojump SSH jumphost. With no config it serves SSH on "
        "127.0.0.1:2222 and keeps its data in ./nekojump-data."
    )
    optParameters = [
        ["config", "c", None, "TOML config file (default: built-in loopback defaults)"],
        ["data-dir", "d", None, "data directory (overrides [storage] data_dir)"],
    ]


def makeService(options: Options) -> IService:
    from nekojump.reactor import install_unless_chosen

    install_unless_chosen()
    from twisted.internet import reactor

    from nekojump.datalock import DataDirectoryInUse
    from nekojump.hostkey import UnusableHostKey
    from nekojump.service import make_service
    from nekojump.store import UnusableDatabase

    try:
        config = load_config(options["config"], options["data-dir"])
    except ConfigError as error:
        raise SystemExit(f"nekojump: {error}") from None
    try:
        service = make_service(config, reactor)
    except OSError as error:
        raise SystemExit(
            f"nekojump: cannot use data directory {config.data_dir}: {error.strerror}"
        ) from None
    except (DataDirectoryInUse, UnusableHostKey) as error:
        raise SystemExit(f"nekojump: {error}") from None
    except UnusableDatabase as error:
        raise SystemExit(
            f"nekojump: cannot use data directory {config.data_dir}: {error}"
        ) from None
    reactor.callWhenRunning(freeze_startup_objects)
    return service


def freeze_startup_objects() -> None:
    """Move what start-up made (modules, classes, config, the web app) out of
    the garbage collector's sight: it lives as long as the process, and every
    full collection would walk it again.  With thousands of tunnels a full
    collection pauses every tunnel; this makes it that much shorter (and a
    small server's a good deal shorter)."""
    gc.collect()
    gc.freeze()
