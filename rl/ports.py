"""A free TCP port for a rendezvous (torch.distributed's store, an SGLang server)."""

from __future__ import annotations

import socket


def free_port(host: str = "") -> int:
    """A port the kernel has just handed out on `host` (all interfaces by default) and taken back. Another
    process may take it before the caller binds it; the callers bind it at once, and a clash fails loudly."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
