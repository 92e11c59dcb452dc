"""What CurveZMQ costs: PUT and GET throughput with and without CURVE, measured in one run.

    python benchmarks/curve.py [--seconds 2] [--repeats 3] [--out FILE.json]

Two node processes run side by side, one plain and one a CURVE server with an allow-list (keys
made by `zmq.auth.create_certificates` in a temporary directory); one client process measures
each in turn. For 256 KiB and 2 MiB values it times acknowledged PUTs and checksum-verified GETs
through `ClusterClient`, each call moving 128 MiB. The store is filled and one untimed pass of the
op runs before timing, so timed PUTs overwrite and timed GETs hit, as in benchmarks/data_path.py.
Each figure is the median of `repeats` runs, plain and CURVE taken back to back. It also times
libsodium's `crypto_box_easy_afternm` and its opening on one core over 2 MiB parts: what libzmq's
CURVE runs on every message part, in the sender's and the receiver's I/O thread, so the most one
CURVE connection can carry before any copy. Prints a table and writes the records read back by
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import glob
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import zmq.auth

from kvcache.cachenode.launcher import LocalCluster, NodeProcess, free_port
from kvcache.client.cluster import ClusterClient
from kvcache.core.config import ClientConfig, CurveClientKeys
from kvcache.core.secrets import curve_client_keys

KiB, MiB = 1 << 10, 1 << 20
SIZES = [256 * KiB, 2 * MiB]
CALL_BYTES = 128 * MiB
TRANSPORTS = ["plain", "curve"]


def _keys(value_bytes: int) -> list[bytes]:
    return [f"{value_bytes:09d}-{i:06d}".encode().ljust(32, b"-")
            for i in range(CALL_BYTES // value_bytes)]  # fmt: skip


def measure(client: ClusterClient, op: str, value_bytes: int, seconds: float) -> float:
    """Payload GB/s of repeated 128 MiB calls for `seconds`, after one untimed call."""
    keys = _keys(value_bytes)
    values = [os.urandom(value_bytes)] * len(keys)

    def one_call() -> int:
        if op == "put":
            return value_bytes * sum(client.put(keys, values))
        return sum(len(value) for value in client.get(keys) if value is not None)

    assert all(client.put(keys, values)), "the fill failed"
    one_call()
    moved, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        moved += one_call()
    return moved / (time.perf_counter() - started) / 1e9


def _libsodium() -> ctypes.CDLL | None:
    """The libsodium libzmq links: the copy bundled in pyzmq's wheel, else the system's."""
    bundled = Path(zmq.__file__).parent.parent / "pyzmq.libs"
    found = glob.glob(str(bundled / "libsodium*")) or [ctypes.util.find_library("sodium")]
    return ctypes.CDLL(found[0]) if found[0] else None


def measure_crypto(seconds: float) -> dict[str, float] | None:
    """GB/s of libsodium sealing and opening 2 MiB parts on one core (None without libsodium)."""
    sodium = _libsodium()
    if sodium is None or sodium.sodium_init() < 0:
        return None
    size, mac_bytes = 2 * MiB, 16
    plain = ctypes.create_string_buffer(os.urandom(size), size)
    sealed = ctypes.create_string_buffer(size + mac_bytes)
    opened = ctypes.create_string_buffer(size)
    nonce = ctypes.create_string_buffer(24)
    key = ctypes.create_string_buffer(os.urandom(32), 32)
    calls = {
        "seal": lambda: sodium.crypto_box_easy_afternm(sealed, plain, ctypes.c_ulonglong(size),
                                                       nonce, key),
        "open": lambda: sodium.crypto_box_open_easy_afternm(opened, sealed,
                                                            ctypes.c_ulonglong(size + mac_bytes),
                                                            nonce, key),
    }  # fmt: skip
    figures = {}
    for name, call in calls.items():
        assert call() == 0
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            assert call() == 0
            count += 1
        figures[name] = count * size / (time.perf_counter() - started) / 1e9
    assert opened.raw == plain.raw
    return figures


def start_nodes(certificates: Path) -> dict[str, NodeProcess]:
    """A plain node and a CURVE node that admits only the benchmark's client key."""
    allowed = certificates / "allowed"
    allowed.mkdir()
    zmq.auth.create_certificates(certificates, "node")
    zmq.auth.create_certificates(allowed, "client")
    curve_flags = ("--curve-key-file", str(certificates / "node.key_secret"),
                   "--curve-allowed-clients", str(allowed))  # fmt: skip
    memory = len(SIZES) * CALL_BYTES + 256 * MiB
    nodes = {
        "plain": NodeProcess("plain", free_port(), free_port(), memory),
        "curve": NodeProcess("curve", free_port(), free_port(), memory, curve_flags),
    }
    LocalCluster.launch(list(nodes.values()))
    return nodes


def stop_nodes(nodes: dict[str, NodeProcess]) -> None:
    for node in nodes.values():
        node.stop()


def client_keys(certificates: Path) -> CurveClientKeys:
    keys = curve_client_keys(
        str(certificates / "node.key"), str(certificates / "allowed" / "client.key_secret"), env={}
    )
    assert keys is not None
    return keys


def measure_all(nodes: dict[str, NodeProcess], curve: CurveClientKeys, seconds: float,
                repeats: int) -> list[dict]:  # fmt: skip
    clients = {
        "plain": ClusterClient([nodes["plain"].member]),
        "curve": ClusterClient([nodes["curve"].member], ClientConfig(curve=curve)),
    }
    records = []
    try:
        for size in SIZES:
            for op in ("put", "get"):
                runs: dict[str, list[float]] = {transport: [] for transport in TRANSPORTS}
                for _ in range(repeats):
                    for transport in TRANSPORTS:
                        runs[transport].append(measure(clients[transport], op, size, seconds))
                for transport, figures in runs.items():
                    gbps = statistics.median(figures)
                    records.append({"transport": transport, "op": op, "value_bytes": size,
                                    "gbps": round(gbps, 3),
                                    "runs": [round(f, 3) for f in figures]})  # fmt: skip
                    each = ", ".join(f"{figure:.2f}" for figure in figures)
                    label = f"{transport:5s} {op:3s} {_size_label(size):>7s}"
                    print(f"{label}: {gbps:.2f} GB/s  (runs: {each})", flush=True)
    finally:
        for client in clients.values():
            client.close()
    return records


def ratios(records: list[dict]) -> list[dict]:
    """CURVE / plain for each (op, size): the share of plain throughput CURVE keeps."""
    figures = {(r["transport"], r["op"], r["value_bytes"]): r["gbps"] for r in records}
    return [
        {"transport": "curve/plain", "op": op, "value_bytes": size,
         "ratio": round(figures[("curve", op, size)] / figures[("plain", op, size)], 3)}
        for size in SIZES for op in ("put", "get")
    ]  # fmt: skip


def _size_label(size: int) -> str:
    return f"{size // MiB} MiB" if size >= MiB else f"{size // KiB} KiB"


def print_table(records: list[dict]) -> None:
    figures = {(r["transport"], r["op"], r["value_bytes"]): r for r in records}
    print(f"\n{'size':>7s} {'op':>3s} {'plain':>7s} {'curve':>7s} {'curve/plain':>11s}")
    for size in SIZES:
        for op in ("put", "get"):
            plain = figures[("plain", op, size)]["gbps"]
            curve = figures[("curve", op, size)]["gbps"]
            ratio = figures[("curve/plain", op, size)]["ratio"]
            print(f"{_size_label(size):>7s} {op:>3s} {plain:7.2f} {curve:7.2f} {ratio:11.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure (median taken)")
    parser.add_argument("--out", default="benchmarks/results/curve.json")
    args = parser.parse_args()

    crypto = measure_crypto(args.seconds)
    with tempfile.TemporaryDirectory(prefix="kvcache-bench-curve-") as directory:
        certificates = Path(directory)
        nodes = start_nodes(certificates)
        try:
            records = measure_all(nodes, client_keys(certificates), args.seconds, args.repeats)
        finally:
            stop_nodes(nodes)
    records += ratios(records)
    print_table(records)
    if crypto is not None:
        print(f"\nlibsodium crypto_box, one core, 2 MiB parts: seal {crypto['seal']:.2f} GB/s, "
              f"open {crypto['open']:.2f} GB/s")  # fmt: skip
        records += [{"transport": "libsodium", "op": op, "value_bytes": 2 * MiB,
                     "gbps": round(gbps, 3)} for op, gbps in crypto.items()]  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    sys.exit(main())
