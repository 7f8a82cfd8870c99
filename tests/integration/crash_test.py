#!/usr/bin/env python3
"""layerd killed at the worst moments, then restarted on the same root and run directory.

1. kill -9 during a storm of 100 concurrent Gets: after the restart every layer whose Get was
   answered is mounted and readable with refcount 1, every other layer has refcount 0 or 1
   (a Get that finished inside layerd but whose answer was lost), Puts bring all of them to
   zero and unmount, and nothing is left: no mount, no fuse-overlayfs process, no staging dir.
2. SIGTERM during an ApplyDiff that is still streaming: layerd exits 0, and after the restart
   the layer is as it was (empty), with no staging leftovers; a new ApplyDiff then works.
3. SIGTERM during a mount storm: after the restart the store is consistent the same way.

usage: crash_test.py LAYERD      (exit 77 = skipped: needs root, /dev/fuse, fuse-overlayfs)
"""
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

LAYERD = None


def skip(why):
    print("SKIP:", why)
    sys.exit(77)


class Daemon:
    def __init__(self, work):
        self.work = work
        self.sock = os.path.join(work, "layerd.sock")
        self.root = os.path.join(work, "home")
        self.proc = None

    def start(self):
        log = open(os.path.join(self.work, "layerd.log"), "a")
        self.proc = subprocess.Popen([LAYERD, "--root", self.root, "--socket", self.sock,
                                      "--run-dir", os.path.join(self.work, "run"),
                                      "--log-level", "debug"], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                call(self.sock, "GET", "/v1/health")
                return
            except OSError:
                time.sleep(0.02)
        raise AssertionError("layerd did not come up")

    def kill(self, sig):
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=20)


def call(sock_path, method, path, body=None, raw=None, chunks=None, timeout=60):
    """One request on a fresh connection. Returns (status, parsed JSON or raw bytes)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(sock_path)
    try:
        if chunks is not None:
            s.sendall(f"{method} {path} HTTP/1.1\r\nHost: \r\nTransfer-Encoding: chunked\r\n\r\n".encode())
            for piece in chunks:
                s.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            s.sendall(b"0\r\n\r\n")
        else:
            data = raw if raw is not None else (json.dumps(body).encode() + b"\n" if body is not None else b"")
            s.sendall(f"{method} {path} HTTP/1.1\r\nHost: \r\nContent-Length: {len(data)}\r\n"
                      f"Connection: close\r\n\r\n".encode() + data)
        resp = b""
        while True:
            got = s.recv(65536)
            if not got:
                break
            resp += got
            head, _, rest = resp.partition(b"\r\n\r\n")
            if b"content-length:" in head.lower():
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                if len(rest) >= length:
                    break
        if b"\r\n\r\n" not in resp:
            raise ConnectionError("connection closed before an answer")
        head, _, rest = resp.partition(b"\r\n\r\n")
        status = int(head.split()[1])
        try:
            return status, json.loads(rest)
        except ValueError:
            return status, rest
    finally:
        s.close()


def plugin(d, name, **fields):
    status, answer = call(d.sock, "POST", "/GraphDriver." + name, body=fields)
    if status != 200 or (isinstance(answer, dict) and answer.get("Err")):
        raise AssertionError(f"{name} {fields}: {status} {answer}")
    return answer


def layers(d):
    status, answer = call(d.sock, "GET", "/v1/layers")
    assert status == 200, answer
    items = answer["layers"] if isinstance(answer, dict) else answer
    return {l["id"]: l for l in items}


def mounts_under(prefix):
    with open("/proc/self/mountinfo") as f:
        return [l.split()[4] for l in f if l.split()[4].startswith(prefix + "/")]


def fuse_servers_under(prefix):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if open(f"/proc/{pid}/comm").read().strip() != "fuse-overlayfs":
                continue
            args = open(f"/proc/{pid}/cmdline").read().rstrip("\0").split("\0")
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if args[-1].startswith(prefix + "/") and state != "Z":
            found.append(int(pid))
    return found


def staging_leftovers(home):
    return [n for n in os.listdir(home) if n.startswith(".layerd-")]


def check_clean(d, what):
    assert not mounts_under(d.root), f"{what}: mounts left: {mounts_under(d.root)}"
    assert not fuse_servers_under(d.root), f"{what}: servers left: {fuse_servers_under(d.root)}"
    assert not staging_leftovers(d.root), f"{what}: staging left: {staging_leftovers(d.root)}"
    for layer in layers(d).values():
        assert layer["refcount"] == 0 and not layer["mounted"], f"{what}: {layer}"


def kill9_during_get_storm(work):
    d = Daemon(work)
    d.start()
    plugin(d, "Create", ID="base")
    with open(os.path.join(d.root, "base", "diff", "file"), "w") as f:
        f.write("payload")
    ids = [f"c{i}" for i in range(100)]
    for i in ids:
        plugin(d, "CreateReadWrite", ID=i, Parent="base")
    answered = {}
    lock = threading.Lock()

    def get(i):
        try:
            status, answer = call(d.sock, "POST", "/GraphDriver.Get", body={"ID": i}, timeout=30)
            if status == 200 and not answer.get("Err"):
                with lock:
                    answered[i] = answer["Dir"]
        except OSError:
            pass  # the connection died with layerd

    threads = [threading.Thread(target=get, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    # Kill once some, but not all, Gets have been answered.
    deadline = time.time() + 30
    while time.time() < deadline and len(answered) < 20:
        time.sleep(0.001)
    d.kill(signal.SIGKILL)
    for t in threads:
        t.join()
    assert 0 < len(answered) < 100, f"{len(answered)} Gets answered before the kill"
    print(f"kill -9 after {len(answered)} of 100 Gets were answered")

    started = time.time()
    d.start()
    print(f"restart to serving: {time.time() - started:.3f} s")
    state = layers(d)
    for i, dir_ in answered.items():
        assert state[i]["mounted"] and state[i]["refcount"] == 1, f"answered {i}: {state[i]}"
        assert open(os.path.join(dir_, "file")).read() == "payload", i
    held = [i for i in ids if state[i]["refcount"] > 0]
    for i in ids:
        assert state[i]["refcount"] in (0, 1), state[i]
        assert state[i]["mounted"] == (state[i]["refcount"] > 0), state[i]
    mounted = set(m.rsplit("/", 2)[-2] for m in mounts_under(d.root))
    assert mounted == set(held), f"mount table {sorted(mounted)} vs held {sorted(held)}"
    assert len(fuse_servers_under(d.root)) == len(held), "one server per held layer"
    for i in held:
        plugin(d, "Put", ID=i)
    check_clean(d, "after the Puts")
    assert d.kill(signal.SIGTERM) == 0


def tar_of(files):
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def sigterm_during_apply(work):
    d = Daemon(work)
    d.start()
    plugin(d, "Create", ID="img")
    payload = tar_of({f"f{i}": os.urandom(64 * 1024) for i in range(64)})
    result = {}

    def slow_chunks():
        # Half the stream, then a pause long enough for SIGTERM to arrive mid-apply.
        half = len(payload) // 2
        for i in range(0, half, 65536):
            yield payload[i:i + 65536]
        time.sleep(3)
        for i in range(half, len(payload), 65536):
            yield payload[i:i + 65536]

    def apply():
        try:
            result["answer"] = call(d.sock, "POST", "/GraphDriver.ApplyDiff?id=img&parent=",
                                    chunks=slow_chunks(), timeout=30)
        except OSError as e:
            result["error"] = str(e)

    t = threading.Thread(target=apply)
    t.start()
    time.sleep(1)
    rc = d.kill(signal.SIGTERM)
    t.join()
    assert rc == 0, f"layerd exited {rc} on SIGTERM during an apply"
    assert "answer" not in result or result["answer"][1].get("Err"), f"apply 'succeeded': {result}"
    d.start()
    assert os.listdir(os.path.join(d.root, "img", "diff")) == [], "a half apply is visible"
    assert not staging_leftovers(d.root), staging_leftovers(d.root)
    status, answer = call(d.sock, "POST", "/GraphDriver.ApplyDiff?id=img&parent=", chunks=[payload])
    assert status == 200 and not answer.get("Err") and answer["Size"] == 64 * 64 * 1024, answer
    assert d.kill(signal.SIGTERM) == 0


def sigterm_during_mounts(work):
    d = Daemon(work)
    d.start()
    plugin(d, "Create", ID="base")
    ids = [f"m{i}" for i in range(60)]
    for i in ids:
        plugin(d, "CreateReadWrite", ID=i, Parent="base")
    answered = []

    def get(i):
        try:
            status, answer = call(d.sock, "POST", "/GraphDriver.Get", body={"ID": i}, timeout=30)
            if status == 200 and not answer.get("Err"):
                answered.append(i)
        except OSError:
            pass

    threads = [threading.Thread(target=get, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    while len(answered) < 10:
        time.sleep(0.001)
    rc = d.kill(signal.SIGTERM)
    for t in threads:
        t.join()
    assert rc == 0, f"layerd exited {rc}"
    d.start()
    state = layers(d)
    for i in answered:
        assert state[i]["mounted"] and state[i]["refcount"] == 1, state[i]
    held = [i for i in ids if state[i]["refcount"] > 0]
    assert set(m.rsplit("/", 2)[-2] for m in mounts_under(d.root)) == set(held)
    for i in held:
        plugin(d, "Put", ID=i)
    check_clean(d, "SIGTERM during mounts")
    assert d.kill(signal.SIGTERM) == 0


def main():
    global LAYERD
    LAYERD = os.path.realpath(sys.argv[1])
    if os.geteuid() != 0:
        skip("needs root (real fuse-overlayfs mounts)")
    if not os.path.exists("/dev/fuse") or shutil.which("fuse-overlayfs") is None:
        skip("needs /dev/fuse and fuse-overlayfs")
    failures = 0
    for case in (kill9_during_get_storm, sigterm_during_apply, sigterm_during_mounts):
        work = tempfile.mkdtemp(prefix="layerd-crash-")
        try:
            case(work)
            print(f"PASS {case.__name__}")
        except Exception as e:  # report every case, then fail
            failures += 1
            print(f"FAIL {case.__name__}: {e!r}")
            log = os.path.join(work, "layerd.log")
            if os.path.exists(log):
                print(open(log).read()[-3000:])
        finally:
            for pid in fuse_servers_under(work):
                os.kill(pid, signal.SIGKILL)
            for m in reversed(mounts_under(work)):
                subprocess.run(["umount", "-l", m])
            subprocess.run(["pkill", "-9", "-f", f"layerd --root {work}/"])
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
