#!/usr/bin/env python3
"""Running out of file descriptors or of processes is a clear error for the request that hits it,
never a crash.

Descriptors: layerd runs with a hard RLIMIT_NOFILE of 64 (it raises its soft limit to the hard
one at start), so every held mount (one pidfd, plus the fds a mount needs while it starts) eats
into a small budget. Gets on one keep-alive connection go on until one fails: its answer must
name the cause (too many open files), layerd must keep answering, and once layers are Put the
same Get works.

Processes: layerd runs in a pids cgroup of its own (cgroup v1 or v2). Once its threads exist, the
cgroup's pids.max is set to the number of tasks in it, so the next fuse-overlayfs cannot start:
that Get must fail naming the layer and the cause, health must answer, a held layer must still
Put, and once the limit is lifted the same Get works. Skipped (with a message) where no pids
cgroup can be made.

usage: limits_test.py LAYERD     (exit 77 = skipped: needs root, /dev/fuse, fuse-overlayfs)
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time


class Client:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.buf = b""

    def call(self, method, path, body=None):
        data = json.dumps(body).encode() + b"\n" if body is not None else b""
        self.sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: \r\nContent-Length: {len(data)}\r\n\r\n"
                          .encode() + data)
        while b"\r\n\r\n" not in self.buf:
            got = self.sock.recv(65536)
            if not got:
                raise ConnectionError("layerd closed the connection")
            self.buf += got
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        while len(self.buf) < length:
            self.buf += self.sock.recv(65536)
        payload, self.buf = self.buf[:length], self.buf[length:]
        return int(head.split()[1]), json.loads(payload)


class Layerd:
    """A layerd on a temporary home, socket and run dir; `prefix` is put before its argv."""

    def __init__(self, layerd, work, prefix=()):
        self.work = work
        self.sock = os.path.join(work, "layerd.sock")
        self.log_path = os.path.join(work, "layerd.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([*prefix, layerd, "--root", os.path.join(work, "home"),
                                      "--socket", self.sock, "--run-dir", os.path.join(work, "run")],
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def client(self):
        for _ in range(200):
            if os.path.exists(self.sock):
                break
            time.sleep(0.02)
        return Client(self.sock)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        with open("/proc/self/mountinfo") as f:
            for line in f:
                if line.split()[4].startswith(self.work + "/"):
                    subprocess.run(["umount", "-l", line.split()[4]])

    def log_tail(self):
        return open(self.log_path).read()[-3000:]


def mounts_under(work):
    with open("/proc/self/mountinfo") as f:
        return [l.split()[4] for l in f if l.split()[4].startswith(work + "/")]


def descriptor_limit(layerd, work):
    d = Layerd(layerd, work, ["prlimit", "--nofile=64:64"])
    try:
        c = d.client()
        c.call("POST", "/GraphDriver.Create", {"ID": "base"})
        held, failure = [], None
        for i in range(80):
            c.call("POST", "/GraphDriver.CreateReadWrite", {"ID": f"l{i}", "Parent": "base"})
            status, answer = c.call("POST", "/GraphDriver.Get", {"ID": f"l{i}"})
            assert status == 200, status
            if answer.get("Err"):
                failure = (f"l{i}", answer["Err"])
                break
            held.append(f"l{i}")
        assert failure, f"{len(held)} mounts with 64 fds and no failure?"
        print(f"descriptors: {len(held)} mounts held; the next Get answered: {failure[1]}")
        assert "Too many open files" in failure[1], failure[1]
        assert failure[0] in failure[1], "the error names the layer"
        status, health = c.call("GET", "/v1/health")
        assert status == 200 and health["status"] == "ok", health
        assert d.proc.poll() is None, "layerd died"
        for layer in held[:10]:
            status, answer = c.call("POST", "/GraphDriver.Put", {"ID": layer})
            assert status == 200 and not answer.get("Err"), answer
        status, answer = c.call("POST", "/GraphDriver.Get", {"ID": failure[0]})
        assert not answer.get("Err"), f"after Puts freed fds, Get still fails: {answer}"
        os.listdir(answer["Dir"])
        for layer in held[10:] + [failure[0]]:
            c.call("POST", "/GraphDriver.Put", {"ID": layer})
        assert not mounts_under(work), f"mounts left: {mounts_under(work)}"
    except (AssertionError, OSError):
        print(d.log_tail())
        raise
    finally:
        d.stop()


def make_pids_cgroup(name):
    """A new pids cgroup (v1 hierarchy or v2 with the pids controller), or None."""
    for root in ("/sys/fs/cgroup/pids", "/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        try:
            if root != "/sys/fs/cgroup/pids":
                with open(os.path.join(root, "cgroup.controllers")) as f:
                    if "pids" not in f.read().split():
                        continue
                with open(os.path.join(root, "cgroup.subtree_control"), "w") as f:
                    f.write("+pids")
            path = os.path.join(root, name)
            os.mkdir(path)
            if os.path.exists(os.path.join(path, "pids.max")):
                return path
            os.rmdir(path)
        except OSError:
            continue
    return None


def read(path):
    with open(path) as f:
        return f.read().strip()


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def process_limit(layerd, work):
    cgroup = make_pids_cgroup(f"layerd-limits-{os.getpid()}")
    if cgroup is None:
        print("processes: SKIP: no pids cgroup can be created here (cgroup v1 pids or v2 +pids)")
        return
    d = Layerd(layerd, work)
    try:
        write(os.path.join(cgroup, "cgroup.procs"), str(d.proc.pid))
        c = d.client()
        c.call("POST", "/GraphDriver.Create", {"ID": "base"})
        for layer in ("warm", "held", "starved"):
            c.call("POST", "/GraphDriver.CreateReadWrite", {"ID": layer, "Parent": "base"})
        # A first mount and unmount start the threads a Get needs (offload workers, io-wq).
        for call in ("Get", "Put"):
            status, answer = c.call("POST", f"/GraphDriver.{call}", {"ID": "warm"})
            assert status == 200 and not answer.get("Err"), answer
        status, answer = c.call("POST", "/GraphDriver.Get", {"ID": "held"})
        assert status == 200 and not answer.get("Err"), answer
        held_dir = answer["Dir"]
        # No room for one more task: layerd's threads and the held layer's server fill it.
        tasks = read(os.path.join(cgroup, "pids.current"))
        write(os.path.join(cgroup, "pids.max"), tasks)
        status, answer = c.call("POST", "/GraphDriver.Get", {"ID": "starved"})
        assert status == 200, status
        err = answer.get("Err", "")
        print(f"processes: pids.max {tasks}; the next Get answered: {err}")
        assert "starved" in err, f"the error names the layer: {err}"
        assert "no more processes" in err and "Resource temporarily unavailable" in err, err
        assert not any(m.endswith("/starved/merged") for m in mounts_under(work)), "starved is mounted"
        status, health = c.call("GET", "/v1/health")
        assert status == 200 and health["status"] == "ok", health
        assert d.proc.poll() is None, "layerd died"
        # What is held keeps working: readable, and its Put needs no new process.
        os.listdir(held_dir)
        status, answer = c.call("POST", "/GraphDriver.Put", {"ID": "held"})
        assert status == 200 and not answer.get("Err"), f"Put under the limit: {answer}"
        write(os.path.join(cgroup, "pids.max"), "max")
        status, answer = c.call("POST", "/GraphDriver.Get", {"ID": "starved"})
        assert status == 200 and not answer.get("Err"), f"Get after the limit was lifted: {answer}"
        os.listdir(answer["Dir"])
        c.call("POST", "/GraphDriver.Put", {"ID": "starved"})
        assert not mounts_under(work), f"mounts left: {mounts_under(work)}"
    except (AssertionError, OSError):
        print(d.log_tail())
        raise
    finally:
        try:
            write(os.path.join(cgroup, "pids.max"), "max")
        except OSError:
            pass
        d.stop()
        for _ in range(100):
            try:
                os.rmdir(cgroup)
                break
            except OSError:
                time.sleep(0.05)


def main():
    layerd = os.path.realpath(sys.argv[1])
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not shutil.which("fuse-overlayfs"):
        print("SKIP: needs root, /dev/fuse and fuse-overlayfs")
        return 77
    ok = True
    for scenario in (descriptor_limit, process_limit):
        work = tempfile.mkdtemp(prefix="layerd-limits-")
        try:
            scenario(layerd, work)
        except (AssertionError, OSError) as e:
            print(f"FAIL ({scenario.__name__}):", e)
            ok = False
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if ok:
        print("PASS")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
