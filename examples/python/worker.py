#!/usr/bin/env python3
"""A complete coordinator worker in Python, speaking the gRPC protocol directly.

It registers, holds one `ReceiveTasks` stream on which tasks are pushed, heartbeats on the interval
the coordinator asks for (naming the tasks it runs, which renews their leases), runs `py_upper`
tasks (the payload in upper case), and reports each result with the attempt it was given: the
attempt is the fencing token. A cancellation on the stream, or a task the heartbeat answer names as
revoked, stops that attempt and its result is never reported. On SIGINT or SIGTERM it deregisters
(no new work), lets running tasks finish within --drain-grace, reports them, hands back what did not
finish, and exits 0; a second signal exits at once. If the coordinator goes away it reconnects with
exponential backoff and full jitter and registers again under the same id.

Generate the stubs once, from the repository root (docs/writing-a-worker.md has the whole recipe):

    python -m grpc_tools.protoc -I proto --python_out=examples/python \
        --grpc_python_out=examples/python proto/coordinator.proto

Then:

    python examples/python/worker.py --coordinator http://127.0.0.1:9090

Add a task type by adding a function to HANDLERS.
"""

import argparse
import concurrent.futures
import logging
import os
import random
import signal
import socket
import sys
import threading
import time
import uuid

try:
    import grpc
except ImportError:
    sys.exit("worker.py: grpcio is not installed: pip install -r examples/python/requirements.txt")

try:
    import coordinator_pb2 as pb
    import coordinator_pb2_grpc as pb_grpc
except ImportError:
    sys.exit(
        "worker.py: no stubs generated from proto/coordinator.proto: run, from the repository root, "
        "python -m grpc_tools.protoc -I proto --python_out=examples/python "
        "--grpc_python_out=examples/python proto/coordinator.proto"
    )

log = logging.getLogger("worker")

VERSION = "python-example-1"
# The coordinator's default message limit (10 MiB); grpc's own client default is 4 MiB.
MAX_MESSAGE = 10 * 1024 * 1024
# Answers that mean a report will never be accepted: stop retrying it.
REFUSED = {
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


class TaskFailure(Exception):
    """Raised by a handler. A retriable failure goes back to the queue while attempts remain."""

    def __init__(self, message, retriable=False):
        super().__init__(message)
        self.message = message
        self.retriable = retriable


class Task:
    """A task as a handler sees it."""

    def __init__(self, assignment, cancelled):
        self.task_id = assignment.task_id
        self.task_type = assignment.task_type
        self.payload = assignment.payload
        self.attempt = assignment.attempt
        # Seconds since the epoch at which the coordinator gives up on this attempt, or None.
        self.deadline = None
        if assignment.HasField("deadline"):
            self.deadline = assignment.deadline.seconds + assignment.deadline.nanos / 1e9
        # Set when the task is cancelled or revoked: a long handler should check it.
        self.cancelled = cancelled


def py_upper(task):
    """The payload, as UTF-8 text, in upper case."""
    try:
        text = task.payload.decode("utf-8")
    except UnicodeDecodeError as e:
        # The same payload can never succeed: not retriable.
        raise TaskFailure(f"invalid py_upper payload: not UTF-8 ({e})")
    return text.upper().encode("utf-8")


# Task type -> handler(Task) -> result bytes (or raise TaskFailure). The keys are the worker's
# capabilities: the coordinator pushes only these types to it.
HANDLERS = {"py_upper": py_upper}


def backoff(n, base=0.2, cap=30.0):
    """Full-jitter exponential backoff: a random delay in [0, min(cap, base * 2^n)]."""
    return random.uniform(0, min(cap, base * (2 ** min(n, 20))))


class Running:
    def __init__(self, attempt):
        self.attempt = attempt
        self.cancelled = threading.Event()
        self.received = time.monotonic()  # the attempt's duration runs from here


class Worker:
    def __init__(self, args):
        self.worker_id = args.worker_id
        self.max_concurrent = args.max_concurrent
        self.drain_grace = args.drain_grace
        self.metadata = [("authorization", f"Bearer {args.token}")] if args.token else []
        target, secure = parse_target(args.coordinator)
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            # Ping only while calls are open and no more often than servers accept.
            ("grpc.keepalive_time_ms", 330_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.keepalive_permit_without_calls", 0),
        ]
        if secure:
            ca = open(args.ca_file, "rb").read() if args.ca_file else None
            channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=ca), options)
        else:
            channel = grpc.insecure_channel(target, options)
        self.stub = pb_grpc.CoordinatorServiceStub(channel)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.max_concurrent)
        self.futures = set()
        # task_id -> Running; the lock guards the map only, never held across a call.
        self.running = {}
        self.lock = threading.Lock()
        # Names this process: registering again from the same process with a list of what it
        # holds lets the coordinator give back, uncharged, a task whose push never arrived.
        self.instance_id = uuid.uuid4().hex
        self.stop = threading.Event()  # set by the first SIGINT/SIGTERM
        self.registered = threading.Event()  # a session is open: heartbeats make sense
        self.reregister = threading.Event()  # a heartbeat answered NOT_FOUND
        self.kick = threading.Event()  # send a heartbeat now
        self.stop_heartbeats = threading.Event()
        self.heartbeat_interval = 1.0  # until the coordinator says
        self.deregistered = False
        self.id_refused = False  # another live worker holds this id (ALREADY_EXISTS)
        self.deregister_lock = threading.Lock()
        self.stream = None  # the open ReceiveTasks call
        self.stream_ended = threading.Event()

    # ---- the session: register, hold the stream ----

    def run(self):
        heartbeats = threading.Thread(target=self.heartbeats, name="heartbeats", daemon=True)
        heartbeats.start()
        failures = 0
        while not self.stop.is_set():
            try:
                self.session()
                if self.stop.is_set():
                    break
                failures = 0
                delay = backoff(1)  # the stream ended cleanly (e.g. its connection aged): reopen soon
                log.info("task stream ended; reconnecting in %.2fs", delay)
            except grpc.RpcError as e:
                if self.stop.is_set():
                    break
                failures += 1
                id_in_use = e.code() == grpc.StatusCode.ALREADY_EXISTS
                # A refused id is tried at least every 5 s: it frees the moment the other one is gone.
                delay = backoff(failures, cap=5.0 if id_in_use else 30.0)
                if id_in_use:
                    # Another live worker holds this id: heartbeats under it would keep
                    # that worker's session alive, so none go out until a registration succeeds.
                    self.registered.clear()
                    self.id_refused = True
                    log.error("%s (give each worker its own id: WORKER_ID or --worker-id); retrying in %.2fs", e.details(), delay)
                else:
                    log.warning("coordinator unreachable (%s: %s); reconnecting in %.2fs", e.code().name, e.details(), delay)
            self.stop.wait(delay)
        self.drain()
        self.stop_heartbeats.set()
        self.kick.set()
        heartbeats.join(timeout=5)
        log.info("worker stopped")

    def held(self):
        """Every (task, attempt) this process runs or has yet to report."""
        with self.lock:
            return [pb.RunningTask(task_id=t, attempt=r.attempt) for t, r in self.running.items()]

    def session(self):
        self.reregister.clear()
        self.stream_ended.clear()
        resp = self.stub.RegisterWorker(
            pb.RegisterWorkerRequest(
                worker_id=self.worker_id,
                max_concurrent_tasks=self.max_concurrent,
                capabilities=sorted(HANDLERS),
                version=VERSION,
                hostname=socket.gethostname(),
                instance_id=self.instance_id,
                running_tasks=self.held(),
            ),
            metadata=self.metadata,
            timeout=10,
        )
        if resp.heartbeat_interval_ms > 0:
            self.heartbeat_interval = resp.heartbeat_interval_ms / 1000
        self.stream = self.stub.ReceiveTasks(
            pb.ReceiveTasksRequest(worker_id=self.worker_id, instance_id=self.instance_id), metadata=self.metadata
        )
        self.registered.set()
        self.id_refused = False
        # The first heartbeat of a session goes out at once: it renews the leases of tasks
        # carried over from before a reconnect.
        self.kick.set()
        log.info(
            "registered; task stream open (session %s on %s, heartbeat every %.1fs)",
            resp.session_id, resp.coordinator_id, self.heartbeat_interval,
        )
        try:
            if self.stop.is_set():
                return  # a signal came while registering: drain() deregisters
            # After Deregister the coordinator sends what was already on its way and ends the
            # stream, so every task assigned to this worker is read and run.
            for assignment in self.stream:
                self.dispatch(assignment)
        except grpc.RpcError as e:
            # Cancelled by us: shutting down, or registering again after NOT_FOUND.
            if e.code() == grpc.StatusCode.CANCELLED and (self.stop.is_set() or self.reregister.is_set()):
                return
            raise
        finally:
            self.stream_ended.set()

    def dispatch(self, a):
        with self.lock:
            current = self.running.get(a.task_id)
            if a.kind == pb.ASSIGNMENT_KIND_CANCEL:
                if current is not None and current.attempt == a.attempt:
                    log.info("task %s attempt %d cancelled by the coordinator", a.task_id, a.attempt)
                    current.cancelled.set()
                return
            if a.kind != pb.ASSIGNMENT_KIND_RUN:
                log.warning("assignment of unknown kind %d for task %s ignored", a.kind, a.task_id)
                return
            if current is not None and current.attempt >= a.attempt:
                return  # a duplicate push
            if current is not None:
                current.cancelled.set()  # an older attempt of the same task: it is no longer ours
            running = Running(a.attempt)
            self.running[a.task_id] = running
        future = self.pool.submit(self.execute, a, running)
        self.futures.add(future)
        future.add_done_callback(self.futures.discard)

    # ---- running and reporting a task ----

    def execute(self, a, running):
        task = Task(a, running.cancelled)
        handler = HANDLERS.get(a.task_type)
        try:
            if handler is None:
                raise TaskFailure(f"unknown task type {a.task_type!r}: this worker runs {', '.join(sorted(HANDLERS))}")
            outcome = handler(task)
        except TaskFailure as f:
            outcome = f
        except Exception as e:  # a bug in a handler is a failure of the task, not of the worker
            outcome = TaskFailure(f"{type(e).__name__}: {e}", retriable=True)
        # A cancelled or revoked attempt belongs to nobody any more: its result is not reported.
        if not running.cancelled.is_set():
            if task.deadline is not None and time.time() > task.deadline and not isinstance(outcome, TaskFailure):
                outcome = TaskFailure("deadline exceeded: the task ran past its deadline", retriable=True)
            held_ms = int((time.monotonic() - running.received) * 1000)
            self.deliver(a.task_id, a.attempt, outcome, running.cancelled, held_ms)
        with self.lock:
            if self.running.get(a.task_id) is running:
                del self.running[a.task_id]

    def deliver(self, task_id, attempt, outcome, cancelled, held_ms):
        """Sends a result until the coordinator accepts or refuses it."""
        tries = 0
        while True:
            try:
                if isinstance(outcome, TaskFailure):
                    resp = self.stub.ReportFailure(
                        pb.ReportFailureRequest(
                            worker_id=self.worker_id, task_id=task_id, attempt=attempt,
                            error=outcome.message, retriable=outcome.retriable, held_ms=held_ms,
                        ),
                        metadata=self.metadata, timeout=10,
                    )
                else:
                    resp = self.stub.ReportCompletion(
                        pb.ReportCompletionRequest(
                            worker_id=self.worker_id, task_id=task_id, attempt=attempt, result=outcome, held_ms=held_ms,
                        ),
                        metadata=self.metadata, timeout=10,
                    )
                log.info(
                    "task %s attempt %d reported %s%s", task_id, attempt,
                    "failed" if isinstance(outcome, TaskFailure) else "completed",
                    " (already accepted)" if resp.duplicate else "",
                )
                return
            except grpc.RpcError as e:
                if e.code() in REFUSED:
                    log.warning("task %s attempt %d: result refused (%s: %s)", task_id, attempt, e.code().name, e.details())
                    return
                if cancelled.is_set():
                    return
                tries += 1
                delay = backoff(tries, cap=5.0)
                log.warning("task %s attempt %d: could not deliver the result (%s); retrying in %.2fs", task_id, attempt, e.code().name, delay)
                time.sleep(delay)

    # ---- heartbeats ----

    def heartbeats(self):
        while not self.stop_heartbeats.is_set():
            self.kick.wait(self.heartbeat_interval)
            self.kick.clear()
            if self.stop_heartbeats.is_set():
                return
            if not self.registered.is_set():
                continue
            held = self.held()
            try:
                resp = self.stub.SendHeartbeat(
                    pb.HeartbeatRequest(worker_id=self.worker_id, running_tasks=held, instance_id=self.instance_id),
                    metadata=self.metadata, timeout=max(self.heartbeat_interval, 1.0),
                )
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND and not self.stop.is_set():
                    # The coordinator does not know this worker (it restarted, or declared it
                    # dead): register again. Running tasks carry on and are reported.
                    log.info("coordinator does not know this worker; registering again")
                    self.registered.clear()
                    self.reregister.set()
                    if self.stream is not None:
                        self.stream.cancel()
                else:
                    log.debug("heartbeat failed: %s", e.code().name)
                continue
            # Attempt-exact: stop only the attempt named. `revoked_task_ids` is what an older
            # coordinator sends; it names tasks only.
            if resp.revoked:
                revoked = [(t.task_id, t.attempt) for t in resp.revoked]
            else:
                revoked = [(t, None) for t in resp.revoked_task_ids]
            with self.lock:
                for task_id, attempt in revoked:
                    r = self.running.get(task_id)
                    if r is not None and attempt in (None, r.attempt):
                        log.warning("task %s attempt %d revoked by the coordinator; stopping it", task_id, r.attempt)
                        r.cancelled.set()

    # ---- shutdown ----

    def on_signal(self, signum, _frame):
        if self.stop.is_set():
            log.warning("second signal: exiting now")
            os._exit(1)
        log.info("%s: draining", signal.Signals(signum).name)
        self.stop.set()
        # Deregister from a thread of its own: the stream then ends by itself once the
        # coordinator has sent what was on its way; if it does not, stop reading after 5 s.
        threading.Thread(target=self.end_stream, daemon=True).start()

    def end_stream(self):
        self.deregister()
        stream = self.stream
        if stream is not None and not self.stream_ended.wait(5):
            stream.cancel()

    def deregister(self):
        """Tells the coordinator this worker takes no new work (once; a second caller waits for
        the first to finish)."""
        with self.deregister_lock:
            if self.deregistered:
                return
            self.deregistered = True
            if self.id_refused:
                return  # the session under this id is another worker's: Deregister would drain it
            try:
                resp = self.stub.Deregister(
                    pb.DeregisterRequest(worker_id=self.worker_id, reason="shutdown", instance_id=self.instance_id),
                    metadata=self.metadata,
                    timeout=5,
                )
                log.info("deregistered; %d tasks in flight", resp.in_flight)
            except grpc.RpcError as e:
                log.warning("deregister failed: %s: %s", e.code().name, e.details())

    def drain(self):
        """Deregisters, lets running tasks finish within the grace period, and hands back what
        did not finish (not charged as an attempt: another worker runs it at once)."""
        self.deregister()
        _, unfinished = concurrent.futures.wait(set(self.futures), timeout=self.drain_grace)
        if not unfinished:
            self.pool.shutdown(wait=True)
            return
        with self.lock:
            left = [(t, r) for t, r in self.running.items()]
        log.warning("grace period over; handing %d unfinished tasks back", len(left))
        for task_id, r in left:
            r.cancelled.set()
            try:
                self.stub.ReportFailure(
                    pb.ReportFailureRequest(
                        worker_id=self.worker_id, task_id=task_id, attempt=r.attempt,
                        error="worker shut down before the task finished", retriable=True, release=True,
                    ),
                    metadata=self.metadata, timeout=2,
                )
            except grpc.RpcError as e:
                log.warning("task %s: hand-back failed: %s", task_id, e.code().name)
        # Handlers still running cannot be interrupted in Python: leave without waiting for them.
        logging.shutdown()
        os._exit(0)


def parse_target(url):
    """`http://host:port` (or `host:port`) -> plaintext; `https://host:port` -> TLS."""
    if url.startswith("https://"):
        return url[len("https://"):].rstrip("/"), True
    if url.startswith("http://"):
        return url[len("http://"):].rstrip("/"), False
    return url, False


def main():
    p = argparse.ArgumentParser(description="A coordinator worker in Python that runs py_upper tasks.")
    p.add_argument("--coordinator", default=os.environ.get("WORKER_COORDINATOR", "http://127.0.0.1:9090"),
                   help="coordinator gRPC URL (http://host:port, or https://host:port with --ca-file)")
    p.add_argument("--worker-id", default=os.environ.get("WORKER_ID") or f"{socket.gethostname()}-py-{os.urandom(3).hex()}")
    p.add_argument("--max-concurrent", type=int, default=2, help="tasks run at once")
    p.add_argument("--drain-grace", type=float, default=30.0, help="seconds running tasks get to finish on shutdown")
    p.add_argument("--ca-file", help="PEM CA bundle that signed the coordinator's certificate")
    p.add_argument("--token-file", help="file holding a worker-role bearer token (or set WORKER_TOKEN)")
    args = p.parse_args()
    args.token = os.environ.get("WORKER_TOKEN")
    if args.token_file:
        args.token = open(args.token_file).read().strip()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    worker = Worker(args)
    signal.signal(signal.SIGINT, worker.on_signal)
    signal.signal(signal.SIGTERM, worker.on_signal)
    log.info("worker %s starting: coordinator %s, task types %s", args.worker_id, args.coordinator, ", ".join(sorted(HANDLERS)))
    worker.run()


if __name__ == "__main__":
    main()
