#!/usr/bin/env python3
"""A persistent prover process for the worker's `persistent:` mode (docs/persistent-prover-protocol.md).

It loads a key file once at start (the expensive part of a real prover), says `ready`, then
serves task after task over stdin/stdout until `shutdown` or EOF. The "proof" is
sha256(sha256(key file) + payload), with this process's pid and task count:

    {"sha256": "...", "pid": 4242, "served": 3, "slot": "0"}

    prover.py [--once] [--no-ready] [KEY_FILE]      (or PROVER_KEY_FILE=KEY_FILE)

--once proves a single payload read from stdin and exits (the per-task `exec` way, to compare).
--no-ready never says ready (to test the worker's start timeout).

A JSON payload can drive the other paths (for tests): {"sleep_ms": N} works N ms, watching for
cancel unless "ignore_cancel": true; {"crash": true} exits mid-task; {"big": N} answers N bytes;
{"garbage": true} writes a line that is not a frame; {"fail": "why", "retriable": true} fails;
{"started": PATH} creates the file PATH when the task begins.
Standard library only.
"""

import hashlib
import json
import os
import queue
import sys
import threading
import time
import traceback

PROTOCOL = 1


def log(*args):
    print("prover:", *args, file=sys.stderr, flush=True)


def load_key(argv):
    paths = [a for a in argv if not a.startswith("--")] or [os.environ.get("PROVER_KEY_FILE", "")]
    if not paths[0]:
        return hashlib.sha256(b"").digest()
    started = time.monotonic()
    digest = hashlib.sha256()
    with open(paths[0], "rb") as f:
        key = f.read()  # keep the whole key in memory, as a prover would
        digest.update(key)
    log(f"loaded {len(key)} key bytes from {paths[0]} in {time.monotonic() - started:.2f}s")
    return digest.digest()


def prove(key_digest, payload, served):
    proof = hashlib.sha256(key_digest + payload).hexdigest()
    answer = {"sha256": proof, "pid": os.getpid(), "served": served, "slot": os.environ.get("PROVER_SLOT", "")}
    return json.dumps(answer).encode()


def send(header, body=b""):
    out = sys.stdout.buffer
    out.write(json.dumps(header).encode() + b"\n" + body)
    out.flush()


EOF = object()


def read_frames(inp, frames):
    """Reader thread: every frame from the worker onto `frames`, then EOF."""
    while True:
        line = inp.readline()
        if not line:
            frames.put(EOF)
            return
        try:
            header = json.loads(line)
        except ValueError as e:
            log(f"not a frame from the worker: {e}")
            os._exit(2)
        body = inp.read(header.get("len", 0)) if header.get("type") == "task" else b""
        frames.put((header, body))


def switches(payload):
    try:
        value = json.loads(payload)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def work(task_id, ms, watch_cancel, frames):
    """Works for `ms` milliseconds; False if cancelled meanwhile. Sends progress every 500 ms."""
    end = time.monotonic() + ms / 1000
    next_progress = time.monotonic() + 0.5
    while (left := end - time.monotonic()) > 0:
        if not watch_cancel:
            time.sleep(min(left, 0.05))
        else:
            try:
                frame = frames.get(timeout=min(left, 0.05))
            except queue.Empty:
                frame = None
            if frame is EOF or (frame and frame[0]["type"] == "shutdown"):
                os._exit(0)
            if frame and frame[0]["type"] == "cancel" and frame[0]["id"] == task_id:
                return False
        if time.monotonic() >= next_progress:
            send({"type": "progress", "id": task_id})
            next_progress += 0.5
    return True


def serve(key_digest):
    frames = queue.Queue()
    threading.Thread(target=read_frames, args=(sys.stdin.buffer, frames), daemon=True).start()
    served = 0
    while True:
        frame = frames.get()
        if frame is EOF or frame[0]["type"] == "shutdown":
            return  # the worker is stopping (or gone)
        header, payload = frame
        if header["type"] != "task":
            continue  # a cancel for a task already answered
        task_id, s = header["id"], switches(payload)
        if "started" in s:
            open(s["started"], "w").close()
        if s.get("crash"):
            log("crashing on request")
            os._exit(3)
        if s.get("garbage"):
            sys.stdout.buffer.write(b"this is not a frame\n")
            sys.stdout.buffer.flush()
            continue
        if not work(task_id, s.get("sleep_ms", 0), not s.get("ignore_cancel"), frames):
            send({"type": "failure", "id": task_id, "message": "cancelled", "retriable": False})
            continue
        if "fail" in s:
            send({"type": "failure", "id": task_id, "message": str(s["fail"]), "retriable": bool(s.get("retriable"))})
            continue
        served += 1
        body = b"x" * int(s["big"]) if "big" in s else prove(key_digest, payload, served)
        send({"type": "result", "id": task_id, "len": len(body)}, body)


def main():
    args = sys.argv[1:]
    if "--once" in args:
        payload = sys.stdin.buffer.read()
        sys.stdout.buffer.write(prove(load_key(args), payload, 1))
        return
    key_digest = load_key(args)
    if "--no-ready" in args:
        time.sleep(3600)
    send({"type": "ready", "protocol": PROTOCOL, "version": "prover.py 1"})
    serve(key_digest)
    # Not a plain return: the reader thread may still block on stdin.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        os._exit(1)
