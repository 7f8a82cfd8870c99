#!/usr/bin/env python3
"""Running out of file descriptors is a clear error for the request that hits it, never a crash.

layerd runs with a hard RLIMIT_NOFILE of 64 (it raises its soft limit to the hard one at start),
so every held mount (one pidfd, plus the fds a mount needs while it starts) eats into a small
budget. Gets on one keep-alive connection go on until one fails: its answer must name the cause
(too many open files), layerd must keep answering, and once layers are Put the same Get works.

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


def main():
    layerd = os.path.realpath(sys.argv[1])
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not shutil.which("fuse-overlayfs"):
        print("SKIP: needs root, /dev/fuse and fuse-overlayfs")
        return 77
    work = tempfile.mkdtemp(prefix="layerd-limits-")
    sock = os.path.join(work, "layerd.sock")
    log = open(os.path.join(work, "layerd.log"), "w")
    proc = subprocess.Popen(["prlimit", "--nofile=64:64", layerd, "--root", os.path.join(work, "home"),
                             "--socket", sock, "--run-dir", os.path.join(work, "run")],
                            stdout=log, stderr=subprocess.STDOUT)
    ok = False
    try:
        for _ in range(200):
            if os.path.exists(sock):
                break
            time.sleep(0.02)
        c = Client(sock)
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
        print(f"{len(held)} mounts held; the next Get answered: {failure[1]}")
        assert "Too many open files" in failure[1], failure[1]
        assert failure[0] in failure[1], "the error names the layer"
        status, health = c.call("GET", "/v1/health")
        assert status == 200 and health["status"] == "ok", health
        assert proc.poll() is None, "layerd died"
        for layer in held[:10]:
            status, answer = c.call("POST", "/GraphDriver.Put", {"ID": layer})
            assert status == 200 and not answer.get("Err"), answer
        status, answer = c.call("POST", "/GraphDriver.Get", {"ID": failure[0]})
        assert not answer.get("Err"), f"after Puts freed fds, Get still fails: {answer}"
        os.listdir(answer["Dir"])
        for layer in held[10:] + [failure[0]]:
            c.call("POST", "/GraphDriver.Put", {"ID": layer})
        with open("/proc/self/mountinfo") as f:
            left = [l.split()[4] for l in f if l.split()[4].startswith(work + "/")]
        assert not left, f"mounts left: {left}"
        ok = True
        print("PASS")
    except (AssertionError, OSError) as e:
        print("FAIL:", e)
        print(open(os.path.join(work, "layerd.log")).read()[-3000:])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        with open("/proc/self/mountinfo") as f:
            for l in f:
                if l.split()[4].startswith(work + "/"):
                    subprocess.run(["umount", "-l", l.split()[4]])
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
