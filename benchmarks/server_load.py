"""Load test for ``tpru serve``: N requests at C concurrent, zero errors expected; throughput and latency.

Either point it at a running server (``--base-url``) or let it start one (``--model DIR``, or ``--tiny`` to build
the tiny random checkpoint and serve that). Workloads: ``verify`` (``POST /v1/verify`` in fast mode: 2 history
frames + 1 observation, one scoring pass each), ``mix`` (alternating ``GET /health`` and fast verify) and
``abusive`` (every 4th request is hostile: a 120 KB chat prompt, a PNG whose header claims 40000x40000, 720
``tpru_score`` continuations of 1,000 characters, a 200 KB ``tpru_score.prefix``, a malformed ``tpru_question``,
``max_tokens`` over the cap; the rest are fast verify calls, which must all succeed with a bounded p99, while
every hostile one gets a 4xx). As in a robot loop the history stays and the observation changes: ``--distinct``
observation frames are cycled (default: a new one per request, so the engine's image cache only helps with the
history).

In the suite (``tpru bench server_load``), :func:`run` serves the tiny checkpoint and runs ``verify`` and
``abusive`` at 16 concurrent, and reports the server's peak resident memory.

Example:
    OMP_NUM_THREADS=1 python benchmarks/server_load.py --tiny --requests 1000 --concurrency 16
    OMP_NUM_THREADS=1 python benchmarks/server_load.py --tiny --workload abusive --requests 400
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class LoadReport:
    """What one load run measured (latencies in milliseconds)."""

    workload: str
    requests: int
    concurrency: int
    errors: int
    wall_s: float
    throughput_rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    statuses: dict[str, int] = field(default_factory=dict)
    first_errors: list[str] = field(default_factory=list)
    abusive: dict | None = None

    def line(self) -> str:
        text = (f"{self.workload}: {self.requests} requests at {self.concurrency} concurrent, {self.errors} errors, "
                f"{self.wall_s:.1f} s, {self.throughput_rps:.1f} req/s, latency p50 {self.p50_ms:.0f} ms, "
                f"p90 {self.p90_ms:.0f} ms, p99 {self.p99_ms:.0f} ms, max {self.max_ms:.0f} ms")
        if self.abusive:
            text += (f"; {self.abusive['requests']} hostile requests: p99 {self.abusive['p99_ms']:.0f} ms, "
                     f"statuses {self.abusive['statuses']}")
        return text


def frame_urls(count: int = 3, size: tuple[int, int] = (168, 112)) -> list[str]:
    """Data URLs of ``count`` distinct small frames inside the TPRU pixel budget (no model needed to make them)."""
    import base64
    import io

    from PIL import Image

    width, height = size
    yy, xx = np.mgrid[0:height, 0:width]
    urls = []
    for i in range(count):
        img = np.zeros((height, width, 3), np.uint8)
        img[..., 0] = xx * 255 // (width - 1)
        img[..., 1] = yy * 255 // (height - 1)
        img[..., 2] = (40 + 50 * i) % 256
        x0 = 8 + (50 * i) % (width - 48)
        img[height // 3: height // 3 + 40, x0: x0 + 40] = (255, (30 * i) % 256, 255)
        img[:4, :4, 0] = np.frombuffer(i.to_bytes(16, "little"), np.uint8).reshape(4, 4)  # unique per i
        img |= np.random.default_rng(i).integers(0, 16, img.shape, dtype=np.uint8)  # sensor noise: real PNG sizes
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


WORKLOADS = ("verify", "mix", "abusive")


def abusive_requests(urls: list[str]) -> list[tuple[str, str, dict]]:
    """``(name, path, json body)`` of each hostile request of the ``abusive`` workload (each must get a 4xx)."""
    import base64
    import struct
    import zlib

    def part(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = b"\x89PNG\r\n\x1a\n" + part(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)) + part(
        b"IDAT", zlib.compress(b"\0" * 64)) + part(b"IEND", b"")
    bomb_url = "data:image/png;base64," + base64.b64encode(bomb).decode()
    user = [{"role": "user", "content": [{"type": "text", "text": "Order: "},
                                         {"type": "image_url", "image_url": {"url": urls[0]}}]}]
    words = " ".join(f"word{i % 97}" for i in range(20000))
    return [
        ("prompt_120kb", "/v1/chat/completions", {"messages": [{"role": "user", "content": words}], "max_tokens": 1}),
        ("bomb_header", "/v1/order", {"frames": [urls[0], bomb_url], "mode": "fast"}),
        ("score_720x1000", "/v1/chat/completions", {"messages": user, "tpru_score": {
            "continuations": [f"{i:04d}" + "x" * 996 for i in range(720)]}}),
        ("score_prefix_200kb", "/v1/chat/completions", {"messages": user, "tpru_score": {
            "continuations": ["<answer>A</answer>", "<answer>B</answer>"], "prefix": words + words}}),
        ("bad_question", "/v1/chat/completions", {"messages": user, "tpru_question": {
            "task": "ordering", "n_images": 1, "labels": list("ABCDEFGHIJ")}}),
        ("max_tokens_1m", "/v1/chat/completions", {"messages": user, "max_tokens": 1_000_000}),
    ]


class _Tally:
    """Latencies and statuses of one class of requests (well-formed or hostile)."""

    def __init__(self):
        self.latencies: list[float] = []
        self.statuses: dict[str, int] = {}
        self.errors: list[str] = []

    def add(self, key: str, seconds: float, ok: bool) -> None:
        self.latencies.append(seconds)
        self.statuses[key] = self.statuses.get(key, 0) + 1
        if not ok and len(self.errors) < 5:
            self.errors.append(key)

    def percentiles(self) -> dict[str, float]:
        lat = np.array(self.latencies or [0.0]) * 1000
        return {"p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
                "p99_ms": float(np.percentile(lat, 99)), "max_ms": float(lat.max())}


async def _one(client, root: str, headers: dict, workload: str, i: int, history, observation, hostile,
               good: _Tally, bad: _Tally) -> None:
    started = time.perf_counter()
    abusive = workload == "abusive" and i % 4 == 3
    try:
        if abusive:
            name, path, body = hostile[(i // 4) % len(hostile)]
            resp = await client.post(f"{root}{path}", json=body, headers=headers)
            ok = 400 <= resp.status_code < 500 and "error" in resp.json()
            bad.add(f"{name}:{resp.status_code}", time.perf_counter() - started, ok)
            return
        if workload == "mix" and i % 2 == 0:
            resp = await client.get(f"{root}/health")
        else:
            body = {"history": history, "observation": observation, "mode": "fast"}
            resp = await client.post(f"{root}/v1/verify", json=body, headers=headers)
        key = str(resp.status_code)
        ok = resp.status_code == 200 and isinstance(resp.json(), dict)
        if ok and "confidence" not in resp.json() and "status" not in resp.json():
            ok, key = False, "bad-body"
    except Exception as exc:  # noqa: BLE001 - every failure is counted, not raised
        key, ok = type(exc).__name__, False
        if abusive:
            bad.add(key, time.perf_counter() - started, False)
            return
    good.add(key, time.perf_counter() - started, ok)


async def _run(base_url: str, workload: str, requests: int, concurrency: int, api_key: str | None,
               timeout: float, distinct: int) -> LoadReport:
    import httpx

    urls = frame_urls(2 + distinct)
    history, observations = urls[:2], urls[2:]
    hostile = abusive_requests(urls) if workload == "abusive" else []
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    good, bad = _Tally(), _Tally()
    counter = iter(range(requests))
    root = base_url.rstrip("/").removesuffix("/v1")

    async def lane(client) -> None:
        for i in counter:
            await _one(client, root, headers, workload, i, history, observations[i % distinct], hostile, good, bad)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        started = time.perf_counter()
        await asyncio.gather(*(lane(client) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    n_err = sum(v for k, v in good.statuses.items() if k != "200") + (len(bad.latencies) - sum(
        v for k, v in bad.statuses.items() if k.rsplit(":", 1)[-1].startswith("4")))
    report = LoadReport(workload, requests, concurrency, n_err, wall, requests / wall, **good.percentiles(),
                        statuses=good.statuses, first_errors=good.errors + bad.errors)
    if hostile:
        report.abusive = {"requests": len(bad.latencies), **bad.percentiles(), "statuses": bad.statuses}
    return report


def run_load(base_url: str, *, workload: str = "verify", requests: int = 1000, concurrency: int = 16,
             api_key: str | None = None, timeout: float = 120.0, distinct: int | None = None) -> LoadReport:
    """Drive a running server and report. Only the given URL is contacted.

    ``distinct`` observation frames are cycled (default: one per request). Latency percentiles are those of the
    well-formed requests; with ``workload="abusive"`` the hostile ones are reported in ``report.abusive``, and an
    error is a well-formed request that failed or a hostile one that did not get a 4xx.
    """
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {WORKLOADS}, got {workload!r}")
    distinct = max(1, requests if distinct is None else distinct)
    return asyncio.run(_run(base_url, workload, requests, concurrency, api_key, timeout, distinct))


def peak_rss_mib(pid: int) -> float:
    """Peak resident memory of a process (Linux ``VmHWM``), in MiB; NaN where unavailable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def run(args) -> dict:
    """Serve the tiny checkpoint (or ``--size``) and run ``verify`` and ``abusive`` at 16 concurrent."""
    import logging

    from benchmarks import model_folder, resolve_device

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    size = args.size if args.size_given else "tiny"
    folder = model_folder(size, args)
    device = resolve_device(args.device)
    n = 64 if args.quick else 400
    port = free_port()
    proc = start_server(str(folder), port=port, extra=["--max-model-len", "4096", "--max-new-tokens", "16",
                                                       "--device", device])
    base = f"http://127.0.0.1:{port}"
    try:
        clean = run_load(base, workload="verify", requests=n, concurrency=16)
        rss_clean = peak_rss_mib(proc.pid)
        mixed = run_load(base, workload="abusive", requests=n, concurrency=16)
        rss = peak_rss_mib(proc.pid)
    finally:
        stop_server(proc)
    good = mixed.requests - mixed.abusive["requests"]
    return {"model_size": size, "device": device, "requests": n, "concurrency": 16,
            "verify": {"errors": clean.errors, "rps": clean.throughput_rps, "p50_ms": clean.p50_ms,
                       "p99_ms": clean.p99_ms},
            "abusive": {"wellformed": good, "hostile": mixed.abusive["requests"], "errors": mixed.errors,
                        "wellformed_p50_ms": mixed.p50_ms, "wellformed_p99_ms": mixed.p99_ms,
                        "hostile_p99_ms": mixed.abusive["p99_ms"],
                        "hostile_4xx": sum(v for k, v in mixed.abusive["statuses"].items()
                                           if k.rsplit(":", 1)[-1].startswith("4"))},
            "server_peak_rss_mib_after_verify": rss_clean, "server_peak_rss_mib": rss}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, *, port: int, extra: list[str] = (), env: dict | None = None,
                 wait_s: float = 120.0) -> subprocess.Popen:
    """Start ``tpru serve`` on 127.0.0.1:``port`` as a subprocess and wait until ``/health`` answers."""
    import httpx

    cmd = [sys.executable, "-m", "tpru_agent.cli.main", "serve", "--model", str(model), "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tpru serve exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"tpru serve did not answer /health within {wait_s:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--base-url", help="a running server, e.g. http://127.0.0.1:8000")
    target.add_argument("--model", help="start `tpru serve --model MODEL` on a free loopback port")
    target.add_argument("--tiny", action="store_true", help="build the tiny random checkpoint and serve it")
    parser.add_argument("--workload", choices=WORKLOADS, default="verify")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--distinct", type=int, default=None,
                        help="distinct observation frames to cycle (default: one per request)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    proc = None
    base = args.base_url
    try:
        if base is None:
            model = args.model
            if args.tiny:
                from tpru_agent.testing import build_tiny_checkpoint

                model = str(build_tiny_checkpoint(Path(tempfile.gettempdir()) / "tpru-tiny-load" / "tiny"))
            port = free_port()
            extra = ["--api-key", args.api_key] if args.api_key else []
            extra += ["--max-model-len", "4096", "--max-new-tokens", "16"]
            proc = start_server(model, port=port, extra=extra)
            base = f"http://127.0.0.1:{port}"
        report = run_load(base, workload=args.workload, requests=args.requests, concurrency=args.concurrency,
                          api_key=args.api_key, distinct=args.distinct)
    finally:
        if proc is not None:
            stop_server(proc)
    print(json.dumps(asdict(report), indent=2) if args.json else report.line())
    return 0 if report.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
