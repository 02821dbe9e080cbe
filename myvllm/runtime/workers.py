"""Ranks 1..N-1 of a tensor-parallel engine, one spawned process each.

Rank 0 is the engine's own process: its ModelRunner holds shard 0 of the model,
and the engine runs the scheduler and the sampler there. Each other rank is a
process started here (torch.multiprocessing, spawn) that builds its own
ModelRunner on its shard and then serves rank 0's requests over a pipe:

    rank 0 (engine process)                        rank r (worker process)
    ModelRunner.execute(batch)
      build_step_inputs(batch)
      send("forward_passes", inputs) -- pipe --> runner.forward_passes(inputs, ...)
      forward          <----- all-reduces ----->     forward
      sample

A step's message is its StepInputs (numpy arrays, pickled once for all workers);
nothing comes back on the pipe unless something fails. The collectives inside
the layers keep the ranks in step.

Startup: rank 0 opens a TCP store on a port the OS picks, starts the workers, and
waits until each has imported everything; then all ranks join the process group
and build their runners (whose first collective is a barrier after loading).

Failures: a worker that raises sends its traceback on its pipe and exits. Rank 0
finds it when a collective fails (gloo sees the closed connection at once), while
waiting for the device (GPU collectives would wait forever, so rank 0 polls the
workers there), or at the next step; it then stops every worker and raises a
WorkerError carrying the traceback. Any exception that escapes a step on rank 0,
Ctrl-C included, also stops the workers: the ranks may be mid-forward, out of
step, and cannot go on. Workers ignore SIGINT (a terminal's Ctrl-C reaches them
too): rank 0 decides. A worker whose rank 0 has gone (its pipe or a collective
fails) exits.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import pickle
import signal
import sys
import time
import traceback
from multiprocessing.connection import wait as wait_for

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from myvllm.config import EngineConfig, ModelConfig
from myvllm.distributed.parallel_state import (
    TensorParallelGroup,
    create_store,
    destroy_tensor_parallel,
    init_tensor_parallel,
)

logger = logging.getLogger(__name__)

STOP = b"stop"
STOP_TIMEOUT_S = 10.0  # a worker asked to stop gets this long before it is terminated
KILL_TIMEOUT_S = 5.0  # and this long after SIGTERM before SIGKILL
REPORT_GRACE_S = 2.0  # after a failed collective, how long rank 0 waits for a worker's report
POLL_INTERVAL_S = 0.002  # how often rank 0 checks the workers while it waits for the device


class WorkerError(RuntimeError):
    """A tensor-parallel worker failed; the message holds its traceback."""


class WorkerGroup:
    """The worker processes of one tensor-parallel engine, seen from rank 0."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig, max_model_len: int,
                 checkpoint_path: str | None) -> None:
        self.size = config.tensor_parallel_size
        self.procs: list = []
        self.conns: list = []
        self.tp: TensorParallelGroup | None = None
        self.error: BaseException | None = None  # why the group stopped, once it has
        self._closed = False
        self._joined = False  # rank 0 has (begun to) set up the process group
        self._on_cuda = config.torch_device.type == "cuda"
        # On CPU the ranks share the cores: each gets its share of rank 0's threads (more would
        # have their spinning threads fight over the cores), restored at shutdown.
        self._threads = None if self._on_cuda else torch.get_num_threads()
        threads = None if self._on_cuda else max(1, self._threads // self.size)
        if dist.is_initialized():
            gc.collect()  # an engine dropped without shutdown() holds the group until it is collected
        if dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is already initialized in this process, by another tensor-parallel engine "
                "(call its shutdown() first: one such engine per process at a time) or by the program itself"
            )
        with self.guard():
            store = create_store(self.size)
            ctx = mp.get_context("spawn")
            for rank in range(1, self.size):
                ours, theirs = ctx.Pipe()
                proc = ctx.Process(target=run_worker, name=f"myvllm-tp{rank}", daemon=True,
                                   args=(rank, store.port, config, model_config, max_model_len, checkpoint_path,
                                         threads, theirs))
                proc.start()
                theirs.close()
                self.procs.append(proc)
                self.conns.append(ours)
            logger.info("started %d tensor-parallel worker(s), rendezvous on port %d", self.size - 1, store.port)
            self._expect("hello")
            if threads is not None:
                torch.set_num_threads(threads)
            self._joined = True
            self.tp = init_tensor_parallel(0, self.size, store, config.rank_device(0))

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    # ---- messages ------------------------------------------------------------------------------

    def send(self, method, *args) -> None:
        """Have every worker run runner.method(*args) (method: a ModelRunner method name, or a
        picklable function taking the runner first); returns without waiting."""
        self.check()
        data = pickle.dumps((method, args, False), protocol=pickle.HIGHEST_PROTOCOL)
        for conn in self.conns:
            conn.send_bytes(data)

    def call(self, method, *args) -> list:
        """Like send, but waits for and returns every worker's result (in rank order). Must
        not run collectives: rank 0 does not join them."""
        with self.guard():
            self.check()
            data = pickle.dumps((method, args, True), protocol=pickle.HIGHEST_PROTOCOL)
            for conn in self.conns:
                conn.send_bytes(data)
            return [payload for _, payload in self._expect("result")]

    def wait_ready(self) -> None:
        """After rank 0's runner is built: wait until every worker's is."""
        self._expect("ready")

    def _expect(self, kind: str) -> list:
        """One message of this kind from each worker, in rank order (raises if one fails)."""
        return [self._receive(i, kind) for i in range(len(self.conns))]

    def _receive(self, i: int, kind: str | None):
        """Worker i's next message (kind None: only if one is waiting, else None). Raises
        WorkerError if it reports an error or has exited."""
        conn, proc = self.conns[i], self.procs[i]
        if kind is not None:
            wait_for([conn, proc.sentinel])
        elif not conn.poll():
            return None
        msg = None
        if conn.poll():
            with contextlib.suppress(EOFError, OSError):
                msg = conn.recv()
        if msg is not None and msg[0] == kind:
            return msg
        rank = i + 1
        if msg is not None and msg[0] == "error":
            raise WorkerError(f"tensor-parallel worker rank {rank} failed:\n{msg[1]}")
        if msg is not None:
            raise WorkerError(f"tensor-parallel worker rank {rank} sent {msg[0]!r}, expected {kind!r}")
        proc.join(REPORT_GRACE_S)
        hint = ""
        if kind == "hello":  # it died importing: spawn runs the main module again in the worker
            hint = ("; its stderr says why. Worker processes are spawned: a script that starts a "
                    "tensor-parallel engine must do so under `if __name__ == \"__main__\":`")
        raise WorkerError(f"tensor-parallel worker rank {rank} (pid {proc.pid}) exited unexpectedly "
                          f"(exit code {proc.exitcode}){hint}")

    def check(self) -> None:
        """Raise if the group has stopped or a worker has reported an error or died."""
        if self.error is not None:
            raise RuntimeError(f"the tensor-parallel workers were stopped after an error ({self.error!r}); "
                               f"create a new engine") from self.error
        if self._closed:
            raise RuntimeError("the tensor-parallel workers were shut down")
        for i in range(len(self.conns)):
            self._receive(i, None)

    def wait_device(self, device: torch.device) -> None:
        """Wait until rank 0's device has finished its queued work, checking the workers every
        POLL_INTERVAL_S: when a worker dies, GPU collectives wait for it forever."""
        if device.type != "cuda":
            return  # CPU collectives return, or fail, before the host goes on
        event = torch.cuda.Event()
        event.record()
        next_check = time.monotonic() + POLL_INTERVAL_S
        while not event.query():
            if time.monotonic() >= next_check:
                self.check()
                next_check = time.monotonic() + POLL_INTERVAL_S
            time.sleep(0)

    # ---- failures and shutdown -------------------------------------------------------------------

    @contextlib.contextmanager
    def guard(self):
        """Around rank 0's part of a step (or of startup): an exception escaping it stops the
        workers; a worker's report, if one explains the exception, is raised instead."""
        try:
            yield
        except BaseException as e:
            report = self._fail(e)
            if report is not None and report is not e:
                raise report from e
            raise

    def _fail(self, exc: BaseException) -> WorkerError | None:
        """Stop the workers after exc; returns the worker report that explains it, if any."""
        if self._closed:
            return None
        report = exc if isinstance(exc, WorkerError) else None
        if report is None and isinstance(exc, (RuntimeError, OSError)):  # a failed collective or pipe:
            report = self._pending_report(REPORT_GRACE_S)  # a worker may have died
        self.error = report or exc
        self.shutdown(abort=True)
        return report

    def _pending_report(self, timeout: float) -> WorkerError | None:
        """The first error report or exit of a worker within timeout seconds, else None."""
        deadline = time.monotonic() + timeout
        waitables = self.conns + [p.sentinel for p in self.procs]
        while True:
            ready = wait_for(waitables, max(0.0, deadline - time.monotonic()))
            for i, (conn, proc) in enumerate(zip(self.conns, self.procs)):
                if conn in ready or proc.sentinel in ready:
                    try:
                        self._receive(i, None)
                    except WorkerError as e:
                        return e
            if time.monotonic() >= deadline:
                return None

    def shutdown(self, abort: bool = False) -> None:
        """Stop the workers and leave the process group; idempotent. Without abort, workers are
        asked to stop and given STOP_TIMEOUT_S; with it (or after that), terminated."""
        if self._closed:
            return
        self._closed = True
        if not abort:
            for conn in self.conns:
                with contextlib.suppress(OSError):
                    conn.send_bytes(STOP)
        if self._joined:
            destroy_tensor_parallel(abort=abort and self._on_cuda)
        deadline = time.monotonic() + (0.0 if abort else STOP_TIMEOUT_S)
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join(KILL_TIMEOUT_S)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()
        if self._threads is not None:
            torch.set_num_threads(self._threads)
        logger.info("tensor-parallel workers stopped")


# ---- the worker process ----------------------------------------------------------------------------


def run_worker(rank: int, port: int, config: EngineConfig, model_config: ModelConfig, max_model_len: int,
               checkpoint_path: str | None, threads: int | None, conn) -> None:
    """Entry point of worker `rank`: build the runner, then serve rank 0 until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for rank 0, which stops the workers
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        from myvllm.runtime.model_runner import ModelRunner

        device = config.rank_device(rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        conn.send(("hello", None))  # rank 0 joins the group once every worker got here
        tp = init_tensor_parallel(rank, config.tensor_parallel_size, port, device)
        runner = ModelRunner(config, model_config, max_model_len, checkpoint_path, tp)
        conn.send(("ready", None))
        _serve(runner, conn)
        destroy_tensor_parallel()
    except BaseException:
        report = traceback.format_exc()
        try:
            conn.send(("error", report))
        except OSError:  # rank 0 has gone: nobody else will show it
            sys.stderr.write(f"tensor-parallel worker rank {rank} failed:\n{report}")
        conn.close()
        os._exit(1)  # skip interpreter teardown: collectives may still be in flight


def _serve(runner, conn) -> None:
    while True:
        try:
            data = conn.recv_bytes()
        except EOFError:  # rank 0 has gone
            os._exit(1)
        if data == STOP:
            return
        method, args, reply = pickle.loads(data)
        fn = getattr(runner, method) if isinstance(method, str) else functools.partial(method, runner)
        result = fn(*args)
        if reply:
            conn.send(("result", result))
