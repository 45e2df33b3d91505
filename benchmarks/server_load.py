"""Load test for ``tpru serve``: N requests at C concurrent, zero errors expected; throughput and latency.

Either point it at a running server (``--base-url``) or let it start one (``--model DIR``, or ``--tiny`` to build
the tiny random checkpoint and serve that). Workloads: ``verify`` (``POST /v1/verify`` in fast mode: 2 history
frames + 1 observation, one scoring pass each) and ``mix`` (alternating ``GET /health`` and fast verify). As in a
robot loop the history stays and the observation changes: ``--distinct`` observation frames are cycled (default:
a new one per request, so the engine's image cache only helps with the history).

Example:
    OMP_NUM_THREADS=1 python benchmarks/server_load.py --tiny --requests 1000 --concurrency 16
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

    def line(self) -> str:
        return (f"{self.workload}: {self.requests} requests at {self.concurrency} concurrent, {self.errors} errors, "
                f"{self.wall_s:.1f} s, {self.throughput_rps:.1f} req/s, latency p50 {self.p50_ms:.0f} ms, "
                f"p90 {self.p90_ms:.0f} ms, p99 {self.p99_ms:.0f} ms, max {self.max_ms:.0f} ms")


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


async def _run(base_url: str, workload: str, requests: int, concurrency: int, api_key: str | None,
               timeout: float, distinct: int) -> LoadReport:
    import httpx

    urls = frame_urls(2 + distinct)
    history, observations = urls[:2], urls[2:]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors: list[str] = []
    counter = iter(range(requests))
    root = base_url.rstrip("/").removesuffix("/v1")

    async def one(client, i: int) -> None:
        started = time.perf_counter()
        try:
            if workload == "mix" and i % 2 == 0:
                resp = await client.get(f"{root}/health")
            else:
                body = {"history": history, "observation": observations[i % distinct], "mode": "fast"}
                resp = await client.post(f"{root}/v1/verify", json=body, headers=headers)
            key = str(resp.status_code)
            ok = resp.status_code == 200 and isinstance(resp.json(), dict)
            if ok and "confidence" not in resp.json() and "status" not in resp.json():
                ok, key = False, "bad-body"
        except Exception as exc:  # noqa: BLE001 - every failure is counted, not raised
            key, ok = type(exc).__name__, False
        latencies.append(time.perf_counter() - started)
        statuses[key] = statuses.get(key, 0) + 1
        if not ok and len(errors) < 5:
            errors.append(key)

    async def lane(client) -> None:
        for i in counter:
            await one(client, i)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        started = time.perf_counter()
        await asyncio.gather(*(lane(client) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    lat = np.array(latencies) * 1000
    n_err = sum(v for k, v in statuses.items() if k != "200")
    return LoadReport(workload, requests, concurrency, n_err, wall, requests / wall, float(np.percentile(lat, 50)),
                      float(np.percentile(lat, 90)), float(np.percentile(lat, 99)), float(lat.max()), statuses,
                      errors)


def run_load(base_url: str, *, workload: str = "verify", requests: int = 1000, concurrency: int = 16,
             api_key: str | None = None, timeout: float = 120.0, distinct: int | None = None) -> LoadReport:
    """Drive a running server and report. Only the given URL is contacted.

    ``distinct`` observation frames are cycled (default: one per request).
    """
    if workload not in ("verify", "mix"):
        raise ValueError(f"workload must be 'verify' or 'mix', got {workload!r}")
    distinct = max(1, requests if distinct is None else distinct)
    return asyncio.run(_run(base_url, workload, requests, concurrency, api_key, timeout, distinct))


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
    parser.add_argument("--workload", choices=["verify", "mix"], default="verify")
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
