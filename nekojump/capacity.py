"""The file-descriptor budget: how many tunnels this process can hold."""

from __future__ import annotations

import resource
from collections.abc import Callable

from nekojump.model import Refused
from nekojump.policy import capacity_refusal

#: Descriptors the process needs besides tunnels: listeners, the database,
#: log files, the dashboard's browsers.
BASELINE = 64


def raise_descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1_048_576)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


class DescriptorBudget:
    """Refuses new SSH connections and forwards once descriptors would run out."""

    def __init__(self, limit: int, in_use: Callable[[], int], reserve: int = BASELINE):
        self.limit = limit
        self.in_use = in_use
        self.reserve = reserve

    @property
    def tunnel_room(self) -> int:
        """Idle tunnels (an SSH socket plus a listener each) that fit."""
        return max(0, (self.limit - self.reserve) // 2)

    def refusal(self, needed: int = 1) -> Refused | None:
        return capacity_refusal(self.in_use(), self.limit, needed, self.reserve)
