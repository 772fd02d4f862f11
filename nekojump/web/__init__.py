"""The web side of nekojump: the member dashboard and the JSON API."""
