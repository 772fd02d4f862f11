"""The SSH side of nekojump: transport, auth, the restricted avatar, forwards."""
