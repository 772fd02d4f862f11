"""Benchmark: nekojump against OpenSSH sshd as a tunnel-only jumphost (see README.md)."""
