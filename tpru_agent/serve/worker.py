"""One thread owns the model: every model call of ``tpru serve`` is a job in its queue.

Engines are not thread-safe (a torch model, an ONNX session), so the HTTP handlers never touch the engine: they
submit a job and await its future. Chat-completion generations that arrive together with the same decoding
options are run as one ``engine.generate`` batch (micro-batching); everything else runs one job at a time, in
arrival order. A full queue refuses new jobs (the server answers 503 with ``Retry-After``) instead of letting
latency grow without bound.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

from tpru_agent.engines.base import GenerationOptions, Request, Usage, as_engine
from tpru_agent.errors import ConfigError, EngineUnavailableError, FrameError, ParseError, TPRUError
from tpru_agent.serve.errors import ClientError

log = logging.getLogger(__name__)


class QueueFullError(TPRUError, RuntimeError):
    """The model queue holds ``max_queue`` jobs already; retry later."""


class WorkerClosedError(TPRUError, RuntimeError):
    """The worker was shut down before the job ran."""


class Generated(NamedTuple):
    """What a generation job returns.

    Attributes:
        text: the engine's reply.
        usage: the tokens the engine counted for this request (``engine.take_usage()`` around its own
            ``generate`` call); ``None`` when it shared the call with other requests.
    """

    text: str
    usage: Usage | None


@dataclass
class _Job:
    future: Future
    call: Callable[[], Any] | None = None
    request: Request | None = None  # set for batchable generate jobs
    options: GenerationOptions | None = None
    queued_at: float = field(default_factory=time.perf_counter)


class ModelWorker:
    """A single model thread fed by a bounded FIFO queue, with micro-batching of generate jobs.

    Args:
        engine: the engine whose ``generate`` batches run here (task calls arrive as plain callables).
        max_queue: most jobs waiting at once; one more raises :class:`QueueFullError`.
        max_batch: most generate requests run as one ``engine.generate`` call.
        batch_wait_s: how long a lone generate job waits for companions before running (0: never waits).

    Example:
        >>> worker = ModelWorker(engine)                     # doctest: +SKIP
        >>> worker.submit(lambda: engine.score(req, conts)).result()   # doctest: +SKIP
    """

    def __init__(self, engine, *, max_queue: int = 256, max_batch: int = 8, batch_wait_s: float = 0.005):
        self.engine = as_engine(engine)
        self.max_queue = max_queue
        self.max_batch = max(1, max_batch)
        self.batch_wait_s = max(0.0, batch_wait_s)
        self._jobs: collections.deque[_Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.stats = {"done": 0, "failed": 0, "batches": 0, "batched_requests": 0, "rejected": 0, "busy_s": 0.0}
        self._thread = threading.Thread(target=self._run, name="tpru-model", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ submit
    def submit(self, call: Callable[[], Any]) -> Future:
        """Queue ``call()`` to run on the model thread; its result (or exception) lands in the future."""
        return self._put(_Job(Future(), call=call))

    def submit_generate(self, request: Request, options: GenerationOptions) -> Future:
        """Queue one generation; it may share an ``engine.generate`` call with others of equal options.

        The future's result is a :class:`Generated`.
        """
        return self._put(_Job(Future(), request=request, options=options))

    def _put(self, job: _Job) -> Future:
        with self._cond:
            if self._closed:
                raise WorkerClosedError("the model worker is shut down")
            if len(self._jobs) >= self.max_queue:
                self.stats["rejected"] += 1
                raise QueueFullError(f"the model queue is full ({self.max_queue} jobs waiting); retry later or "
                                     "start the server with a larger --max-queue")
            self._jobs.append(job)
            self._cond.notify()
        return job.future

    @property
    def depth(self) -> int:
        """Jobs waiting (not counting the one running)."""
        return len(self._jobs)

    # ------------------------------------------------------------------ the model thread
    def _take(self) -> list[_Job] | None:
        with self._cond:
            while not self._jobs and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            head = self._jobs.popleft()
            if head.request is None:
                return [head]
            if len(self._jobs) == 0 and self.batch_wait_s > 0 and self.max_batch > 1:
                self._cond.wait(self.batch_wait_s)  # let concurrent callers join the batch
            batch = [head]
            for job in list(self._jobs):
                if len(batch) >= self.max_batch:
                    break
                if job.request is not None and job.options == head.options:
                    self._jobs.remove(job)
                    batch.append(job)
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            live = [job for job in batch if job.future.set_running_or_notify_cancel()]
            if not live:
                continue
            started = time.perf_counter()
            try:
                if live[0].request is None:
                    self._finish(live[0], live[0].call)
                else:
                    self._generate(live)
            finally:
                self.stats["busy_s"] += time.perf_counter() - started

    def _finish(self, job: _Job, call: Callable[[], Any]) -> None:
        try:
            result = call()
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to its caller
            self.stats["failed"] += 1
            job.future.set_exception(exc)
        else:
            self.stats["done"] += 1
            job.future.set_result(result)

    def _generate(self, jobs: list[_Job]) -> None:
        if len(jobs) > 1:
            self.stats["batches"] += 1
            self.stats["batched_requests"] += len(jobs)
        try:
            texts, used = self.engine.counting(lambda: self.engine.generate([job.request for job in jobs],
                                                                            jobs[0].options))
            if len(texts) != len(jobs):
                raise TPRUError(f"the engine returned {len(texts)} texts for {len(jobs)} requests")
        except BaseException as exc:  # noqa: BLE001
            if len(jobs) == 1:
                self.stats["failed"] += 1
                jobs[0].future.set_exception(exc)
                return
            # One bad request must not fail its batch-mates: run each alone.
            log.info("batched generate failed (%s); retrying the %d requests one by one", exc, len(jobs))
            for job in jobs:
                self._finish(job, lambda job=job: self._alone(job))
            return
        for job, text in zip(jobs, texts):
            self.stats["done"] += 1
            job.future.set_result(Generated(text, used if len(jobs) == 1 else None))

    def _alone(self, job: _Job) -> Generated:
        texts, used = self.engine.counting(lambda: self.engine.generate([job.request], job.options))
        return Generated(texts[0], used)

    # ------------------------------------------------------------------ lifecycle
    def close(self, timeout: float = 10.0) -> None:
        """Stop taking jobs, fail the waiting ones with :class:`WorkerClosedError`, and join the thread."""
        with self._cond:
            self._closed = True
            waiting = list(self._jobs)
            self._jobs.clear()
            self._cond.notify_all()
        for job in waiting:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(WorkerClosedError("the server shut down before this request ran"))
        self._thread.join(timeout)


async def run_model(state, call: Callable[[], Any] | None = None, *, submit: Callable[[], Any] | None = None,
                    cancel: threading.Event | None = None) -> Any:
    """Queue ``call`` on the model thread (or a job with ``submit()``), await it, map failures to HTTP errors.

    ``state`` is the app's state (``worker``, ``config``, ``scrub``). After ``config.request_timeout_s`` the
    request gets a 504, the job is dropped if it has not started, and ``cancel`` is set so a running generation
    stops at its next token.
    """
    try:
        fut = submit() if submit is not None else state.worker.submit(call)
    except QueueFullError as exc:
        raise ClientError(503, str(exc), kind="server_busy", code="queue_full", headers={"Retry-After": "1"}) from exc
    except WorkerClosedError as exc:
        raise ClientError(503, str(exc), kind="server_busy", code="shutting_down") from exc
    try:
        return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), state.config.request_timeout_s)
    except asyncio.TimeoutError as exc:
        fut.cancel()
        if cancel is not None:
            cancel.set()
        raise ClientError(504, f"the model did not answer within {state.config.request_timeout_s:g} s (tpru serve "
                          "--timeout)", kind="timeout", code="timeout") from exc
    except asyncio.CancelledError:  # the client went away: stop the work it asked for
        fut.cancel()
        if cancel is not None:
            cancel.set()
        raise
    except Exception as exc:  # noqa: BLE001 - mapped or re-raised below
        raise model_error(exc, state.scrub) from exc


def model_error(exc: Exception, scrub: Callable[[str], str] = str) -> Exception:
    """The HTTP error for a failed model call (typed SDK errors); anything else is returned as is (a 500)."""
    if isinstance(exc, ClientError):
        return exc
    if isinstance(exc, (FrameError, ConfigError)):
        return ClientError(400, scrub(str(exc)), code=type(exc).__name__)
    if isinstance(exc, ParseError):
        return ClientError(422, scrub(str(exc)), kind="parse_error", code="unparseable_model_output")
    if isinstance(exc, WorkerClosedError):
        return ClientError(503, str(exc), kind="server_busy", code="shutting_down")
    if isinstance(exc, EngineUnavailableError):
        return ClientError(503, scrub(str(exc)), kind="server_error", code="engine_unavailable")
    if isinstance(exc, TPRUError):
        log.warning("model call failed: %s", exc)
        return ClientError(502, scrub(f"{type(exc).__name__}: {exc}"), kind="server_error", code="engine_error")
    return exc


__all__ = ["Generated", "ModelWorker", "QueueFullError", "WorkerClosedError", "model_error", "run_model"]
