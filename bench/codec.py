"""Codec size and speed for a realistic batch, beside plain pickle measured in the same run.

Run: python bench/codec.py [--quick]

The batch: 1,000 generated analytics events of about 300 bytes of JSON each (ids, timestamps,
a nested user, properties with a nullable referrer, tags). Table 1 gives, for every serializer
and each compression algorithm at its fast, default and strongest levels, the frame size, the
ratio to the batch's compact JSON size, and encode/decode speed in MB/s of that same JSON size
(one yardstick for every row, so rows compare directly) per second of this process's CPU time.
Table 2 sets the project's json path against ``pickle.dumps`` / ``pickle.loads`` of the same
batch (the baseline, 1.00x).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import random
import sys
import time
import timeit
import uuid
from collections.abc import Callable
from importlib import metadata
from typing import Any

from batchpunk.codec import decode_batch, decode_value, encode_batch, encode_value
from batchpunk.codec import serializers as _serializers

EVENTS = 1000

#: (compression, level) rows: fast, default and strongest level of each algorithm.
COMPRESSIONS: list[tuple[str, int | None]] = [
    ("none", None),
    ("zlib", 1),
    ("zlib", None),
    ("zlib", 9),
    ("gzip", 1),
    ("gzip", None),
    ("gzip", 9),
    ("zstd", -5),
    ("zstd", 1),
    ("zstd", None),
    ("zstd", 9),
    ("zstd", 19),
    ("zstd", 22),
    ("lz4", None),
    ("lz4", 9),
    ("lz4", 16),
]
SERIALIZERS = ("json", "msgpack", "pickle")
DEFAULT_LEVELS = {"zlib": -1, "gzip": -1, "zstd": 3, "lz4": 0}


def make_events(n: int, seed: int = 7) -> list[dict[str, Any]]:
    """n analytics events like a web service would emit, deterministic for a given seed."""
    rng = random.Random(seed)
    kinds = ["page_view", "click", "add_to_cart", "purchase", "signup"]
    countries = ["DE", "US", "FR", "JP", "BR", "IN", "GB"]
    tags = ["mobile", "desktop", "beta", "sale", "returning", "new"]
    events = []
    for i in range(n):
        events.append(
            {
                "event_id": str(uuid.UUID(int=rng.getrandbits(128))),
                "type": rng.choice(kinds),
                "ts": f"2024-05-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:"
                f"{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}.{rng.randint(0, 999):03d}Z",
                "user": {
                    "id": rng.randint(1, 10**9),
                    "country": rng.choice(countries),
                    "plan": rng.choice(["free", "pro", "team"]),
                },
                "props": {
                    "path": f"/products/{rng.randint(1, 99_999)}",
                    "referrer": rng.choice([None, "https://www.example.com/search?q=shoes"]),
                    "duration_ms": round(rng.uniform(0, 5000), 3),
                    "tags": rng.sample(tags, 2),
                },
                "session": uuid.UUID(int=rng.getrandbits(128)).hex[:16],
                "seq": i,
            }
        )
    return events


def best_seconds(fn: Callable[[], object], repeats: int, min_time: float) -> float:
    """Least CPU time of one call, over ``repeats`` runs of at least ``min_time`` seconds each.

    CPU time (time.process_time), not wall time: the codec is CPU-bound and single-threaded,
    and on a shared machine wall time mostly measures how long other processes held the CPU.
    """
    timer = timeit.Timer(fn, timer=time.process_time)
    number = 1
    while True:
        if timer.timeit(number) >= min_time:
            break
        number *= 2
    return min(timer.repeat(repeat=repeats, number=number)) / number


def fmt_level(compression: str, level: int | None) -> str:
    if compression == "none":
        return "-"
    if level is None:
        return f"{DEFAULT_LEVELS[compression]} (default)"
    return str(level)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer and shorter timing runs")
    args = parser.parse_args()
    repeats, min_time = (3, 0.02) if args.quick else (7, 0.2)

    events = make_events(EVENTS)
    reference = len(json.dumps(events, separators=(",", ":")).encode())
    mb = reference / 1e6

    versions = ", ".join(
        f"{name} {metadata.version(name)}" for name in ("orjson", "msgspec", "zstandard", "lz4")
    )
    print(
        f"Python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs; "
        f"{versions}"
    )
    if hasattr(os, "getloadavg"):
        print(f"Load average at start: {os.getloadavg()[0]:.2f} (MB/s are per CPU second)")
    print(
        f"Batch: {EVENTS} events, {reference:,} bytes of compact JSON "
        f"({reference / EVENTS:.0f} bytes/event); MB/s are of those {reference:,} bytes."
    )
    print()
    print("Table 1: encode_batch / decode_batch, threshold 1024, unsigned")
    header = (
        f"{'serializer':<10} {'compression':<11} {'level':<12} {'bytes':>9} {'ratio':>6} "
        f"{'encode MB/s':>12} {'decode MB/s':>12}"
    )
    print(header)
    print("-" * len(header))
    for serializer in SERIALIZERS:
        for compression, level in COMPRESSIONS:
            frame = encode_batch(
                events, serializer=serializer, compression=compression, level=level
            )
            allow = serializer == "pickle"
            assert decode_batch(frame, allow_pickle=allow) == events
            enc = best_seconds(
                lambda s=serializer, c=compression, lv=level: encode_batch(
                    events, serializer=s, compression=c, level=lv
                ),
                repeats,
                min_time,
            )
            dec = best_seconds(
                lambda f=frame, a=allow: decode_batch(f, allow_pickle=a), repeats, min_time
            )
            print(
                f"{serializer:<10} {compression:<11} {fmt_level(compression, level):<12} "
                f"{len(frame):>9,} {reference / len(frame):>6.2f} {mb / enc:>12.0f} "
                f"{mb / dec:>12.0f}"
            )

    print()
    print("Table 2: the project's json path against pickle (baseline) on the same batch")
    pickled = pickle.dumps(events, protocol=5)
    rows: list[tuple[str, Callable[[], object], Callable[[], object]]] = []
    rows.append(
        (
            "pickle.dumps / loads (baseline)",
            lambda: pickle.dumps(events, protocol=5),
            lambda: pickle.loads(pickled),
        )
    )
    plain = json.dumps(events, separators=(",", ":")).encode()
    rows.append(
        (
            "stdlib json.dumps / loads",
            lambda: json.dumps(events, separators=(",", ":")).encode(),
            lambda: json.loads(plain),
        )
    )
    value = encode_value(events)
    rows.append(
        (
            "batchpunk json, orjson",
            lambda: encode_value(events),
            lambda: decode_value(value),
        )
    )

    def without_orjson(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            saved = _serializers._orjson
            _serializers._orjson = None
            try:
                return fn()
            finally:
                _serializers._orjson = saved

        return run

    rows.append(
        (
            "batchpunk json, stdlib only",
            without_orjson(lambda: encode_value(events)),
            without_orjson(lambda: decode_value(value)),
        )
    )
    framed = encode_batch(events, compression="none")
    rows.append(
        (
            "encode_batch json, no compression",
            lambda: encode_batch(events, compression="none"),
            lambda: decode_batch(framed),
        )
    )
    zframed = encode_batch(events)
    rows.append(
        (
            "encode_batch json, zlib (defaults)",
            lambda: encode_batch(events),
            lambda: decode_batch(zframed),
        )
    )
    header = (
        f"{'path':<36} {'encode MB/s':>12} {'vs pickle':>10} {'decode MB/s':>12} {'vs pickle':>10}"
    )
    print(header)
    print("-" * len(header))
    base_enc = base_dec = 0.0
    for name, enc_fn, dec_fn in rows:
        enc = mb / best_seconds(enc_fn, repeats, min_time)
        dec = mb / best_seconds(dec_fn, repeats, min_time)
        if not base_enc:
            base_enc, base_dec = enc, dec
        print(
            f"{name:<36} {enc:>12.0f} {enc / base_enc:>9.2f}x {dec:>12.0f} {dec / base_dec:>9.2f}x"
        )
    if hasattr(os, "getloadavg"):
        print(f"Load average at end: {os.getloadavg()[0]:.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
