"""Ports for servers launched side by side on one node (`rl.ports.server_ports`)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from rl import ports
from rl.ports import LEASE_S, LOWEST, server_ports

ROOT = Path(__file__).resolve().parents[1]


def test_no_port_is_handed_out_twice_on_a_node_from_any_process(tmp_path):
    registry = tmp_path / "ports.json"
    here = server_ports(3, registry)
    there = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from rl.ports import "
                            "server_ports; print(*server_ports(3, Path(sys.argv[1])))", str(registry)],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    again = server_ports(3, registry)
    everything = here + [int(p) for p in there] + again
    assert len(set(everything)) == 9
    assert all(LOWEST <= p < ports._ephemeral_range()[0] for p in everything)  # no outgoing connection takes them


def test_a_lease_ends_and_a_half_written_registry_counts_as_empty(tmp_path):
    registry = tmp_path / "ports.json"
    now = time.time()
    below = range(LOWEST, ports._ephemeral_range()[0])
    last = next(p for p in reversed(below) if ports._binds(p))
    leases = {str(p): now for p in below} | {str(last): now - LEASE_S - 1}
    registry.write_text(json.dumps(leases))
    assert server_ports(1, registry) == [last]  # the one lease that ended
    registry.write_text('{"20000": 17')
    assert len(server_ports(2, registry)) == 2


def test_a_node_whose_ephemeral_range_starts_low_still_gets_ports(tmp_path, monkeypatch):
    monkeypatch.setattr(ports, "_ephemeral_range", lambda: (1024, 40000))  # tuned nodes: no room below it
    assert all(p > 40000 for p in server_ports(2, tmp_path / "a.json"))
    monkeypatch.setattr(ports, "_ephemeral_range", lambda: (1024, 65535))  # none outside it: anywhere, leased
    assert len(set(server_ports(2, tmp_path / "b.json"))) == 2
