"""twistd plugin: ``twistd -n nekojump [--config FILE]``."""

from twisted.application.service import ServiceMaker

nekojump = ServiceMaker(
    "nekojump",
    "nekojump.tap",
    "SSH jumphost holding tunnel-only remote forwards",
    "nekojump",
)
