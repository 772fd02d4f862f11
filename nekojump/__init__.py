"""nekojump: an SSH jumphost whose only account can hold remote forwards."""

__version__ = "0.1.0"
