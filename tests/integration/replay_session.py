#!/usr/bin/env python3
"""Replays the dockerd 20.10 session captured in shared/protocol against a real layerd.

Every request of the capture is sent as dockerd sent it (method, path, headers, keep-alive,
chunked ApplyDiff bodies) over a real unix socket to a real layerd with real fuse-overlayfs
mounts. Tar bodies, summarized in the capture, are rebuilt from their member names. Each answer
is checked for the shape dockerd expects, and the layer state on disk after each call: created
layers exist with the seed layout, Get answers a mounted merged dir (or the diff dir of a base
layer), the last Put unmounts, Remove deletes. Where the capture shows what the container
changed, those edits are made through the mount before Changes, and the answer must list the
same changes as dockerd saw.

usage: replay_session.py LAYERD SESSION.jsonl
Exit 77 (skipped) without root, /dev/fuse or fuse-overlayfs.
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
import time

RECORDED_HOME = "/var/lib/docker/gdstub"


def skip(why):
    print("SKIP:", why)
    sys.exit(77)


class Failure(Exception):
    pass


def expect(cond, what):
    if not cond:
        raise Failure(what)


class Connection:
    """One keep-alive HTTP/1.1 connection, like dockerd's Go client."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.settimeout(60)
        self.buf = b""

    def _read_more(self):
        data = self.sock.recv(65536)
        if not data:
            raise Failure("layerd closed the connection")
        self.buf += data

    def _read_line(self):
        while b"\r\n" not in self.buf:
            self._read_more()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _read_exact(self, n):
        while len(self.buf) < n:
            self._read_more()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def request(self, method, target, headers, body):
        head = f"{method} {target} HTTP/1.1\r\n"
        for k, v in headers.items():
            if k.lower() in ("content-length", "transfer-encoding"):
                continue
            head += f"{k}: {v}\r\n"
        if headers.get("Transfer-Encoding") == "chunked":
            head += "Transfer-Encoding: chunked\r\n\r\n"
            out = head.encode()
            # Go's client writes chunks as they come: several, of uneven sizes.
            for i in range(0, len(body), 32768):
                piece = body[i:i + 32768]
                out += f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
            out += b"0\r\n\r\n"
        else:
            head += f"Content-Length: {len(body)}\r\n\r\n"
            out = head.encode() + body
        self.sock.sendall(out)
        status_line = self._read_line().decode()
        status = int(status_line.split()[1])
        resp_headers = {}
        while True:
            line = self._read_line().decode()
            if not line:
                break
            k, v = line.split(":", 1)
            resp_headers[k.strip().lower()] = v.strip()
        if resp_headers.get("transfer-encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self._read_line().split(b";")[0], 16)
                if size == 0:
                    while self._read_line():
                        pass
                    break
                data += self._read_exact(size)
                self._read_exact(2)
        else:
            data = self._read_exact(int(resp_headers.get("content-length", "0")))
        return status, resp_headers, data


def build_tar(summary):
    """A tar whose members are those named in a capture summary like
    "<tar stream N bytes, M members, first=['.', 'etc', 'etc/hello']>"."""
    names = eval(summary[summary.index("first=") + 6:summary.rindex("]") + 1])  # list literal
    dirs = {n for n in names if any(o.startswith(n.rstrip("/") + "/") for o in names if o != n)}
    dirs |= {"tmp", "etc", "bin", "."} & set(names)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.mtime = 1700000000
            if name in dirs:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            else:
                data = b"" if "/.wh." in "/" + name else f"content of {name}\n".encode()
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue(), names, dirs


def mounted(path):
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def main():
    layerd, session = sys.argv[1], sys.argv[2]
    if os.geteuid() != 0:
        skip("needs root (real fuse-overlayfs mounts)")
    if not os.path.exists("/dev/fuse"):
        skip("needs /dev/fuse")
    if shutil.which("fuse-overlayfs") is None:
        skip("needs fuse-overlayfs")

    work = tempfile.mkdtemp(prefix="layerd-replay-")
    home = os.path.join(work, "docker", "layerd")
    sock_path = os.path.join(work, "layerd.sock")
    log = open(os.path.join(work, "layerd.log"), "w")
    proc = subprocess.Popen([layerd, "--root", os.path.join(work, "default-root"),
                             "--socket", sock_path, "--run-dir", os.path.join(work, "run"),
                             "--log-level", "debug"], stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(200):
            if os.path.exists(sock_path):
                break
            time.sleep(0.02)
        conn = Connection(sock_path)
        # /v1/events, followed for the whole replay on its own connection.
        events_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        events_sock.connect(sock_path)
        events_sock.sendall(b"GET /v1/events HTTP/1.1\r\nHost: layerd\r\n\r\n")
        events_raw = []

        def follow_events():
            while True:
                try:
                    data = events_sock.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                events_raw.append(data)

        import threading
        events_thread = threading.Thread(target=follow_events, daemon=True)
        events_thread.start()
        refs = {}       # layer -> Get count (as layerd should track it)
        parents = {}    # layer -> parent
        replayed = 0
        for lineno, line in enumerate(open(session), 1):
            rec = json.loads(line)
            if "req" not in rec:
                continue
            method, target, _ = rec["req"].split(" ", 2)
            target = target.replace(RECORDED_HOME, home)
            call = target.split("?")[0].rsplit(".", 1)[-1]
            body = rec.get("body", "")
            where = f"session line {lineno} ({call})"
            tar_names = tar_dirs = None
            if isinstance(body, str) and body.startswith("<tar stream"):
                payload, tar_names, tar_dirs = build_tar(body)
            elif call == "ApplyDiff":
                # A capture line without a body summary (an injected failure): an empty tar.
                payload = b"\0" * 1024
                tar_names, tar_dirs = [], set()
            else:
                payload = body.replace(RECORDED_HOME, home).encode()
            request = json.loads(payload) if payload and call not in ("ApplyDiff",) else {}
            layer = request.get("ID") or ""
            if call == "ApplyDiff":
                query = dict(kv.split("=", 1) for kv in target.split("?", 1)[1].split("&"))
                layer = query["id"]

            if call == "Changes" and "Changes" in rec.get("resp", {}):
                # Re-create what the container did, through the mount, as dockerd saw it.
                status, _, data = conn.request("POST", "/GraphDriver.Get", {},
                                               json.dumps({"ID": layer}).encode() + b"\n")
                d = json.loads(data)["Dir"]
                for change in rec["resp"]["Changes"]:
                    p = d + change["Path"]
                    if change["Kind"] == 2 and os.path.lexists(p):
                        os.remove(p)
                    elif change["Kind"] == 1 and not os.path.exists(p):
                        open(p, "w").write("added\n")
                conn.request("POST", "/GraphDriver.Put", {},
                             json.dumps({"ID": layer}).encode() + b"\n")

            status, headers, data = conn.request(method, target, rec["hdr"], payload)
            replayed += 1
            expect(status == 200, f"{where}: HTTP {status}: {data[:200]!r}")

            if call == "Diff":
                with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                    names = tar.getnames()
                expect(len(data) % 512 == 0 and len(data) > 0, f"{where}: not a tar stream")
                expect(any(n.endswith(".wh.hello") for n in names),
                       f"{where}: the deleted /etc/hello is not in the diff: {names}")
                continue
            answer = json.loads(data)
            err = answer.get("Err", "")
            recorded_err = rec.get("resp", {}).get("Err", "") if isinstance(rec.get("resp"), dict) else ""
            if recorded_err.startswith("injected failure"):
                # The capture's stub failed on purpose; layerd has no reason to. dockerd believed
                # the call failed and will not undo it: a Get is released here in its stead.
                expect(err == "", f"{where}: {err}")
                if call == "Get":
                    conn.request("POST", "/GraphDriver.Put", {},
                                 json.dumps({"ID": layer}).encode() + b"\n")
                    continue
            else:
                expect(err == "", f"{where}: unexpected error {err!r}")

            if call == "Activate":
                expect(answer == {"Implements": ["GraphDriver"]}, f"{where}: {answer}")
            elif call == "Init":
                expect(os.path.isdir(os.path.join(home, "l")), f"{where}: home not initialised")
            elif call == "Capabilities":
                expect(isinstance(answer.get("Capabilities", {}).get("ReproducesExactDiffs"), bool),
                       f"{where}: {answer}")
            elif call == "Status":
                pairs = answer["Status"]
                expect(all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p)
                           for p in pairs), f"{where}: Status is not pairs: {pairs}")
                expect(dict(pairs).get("Home") == home, f"{where}: Home {dict(pairs).get('Home')}")
            elif call in ("Create", "CreateReadWrite"):
                layer_dir = os.path.join(home, layer)
                expect(os.path.isdir(os.path.join(layer_dir, "diff")), f"{where}: no {layer_dir}/diff")
                link = open(os.path.join(layer_dir, "link")).read()
                expect(os.readlink(os.path.join(home, "l", link)) == f"../{layer}/diff",
                       f"{where}: bad link")
                parents[layer] = request.get("Parent", "")
            elif call == "Get":
                d = answer["Dir"]
                refs[layer] = refs.get(layer, 0) + 1
                if parents.get(layer):
                    expect(d == os.path.join(home, layer, "merged"), f"{where}: Dir {d}")
                    expect(mounted(d), f"{where}: {d} is not mounted")
                else:
                    expect(d == os.path.join(home, layer, "diff"), f"{where}: Dir {d}")
            elif call == "Put":
                refs[layer] = max(0, refs.get(layer, 0) - 1)
                merged = os.path.join(home, layer, "merged")
                expect(mounted(merged) == (refs[layer] > 0),
                       f"{where}: mounted={mounted(merged)} with {refs[layer]} refs left")
            elif call == "Remove":
                expect(not os.path.exists(os.path.join(home, layer)), f"{where}: still on disk")
                expect(not mounted(os.path.join(home, layer, "merged")), f"{where}: still mounted")
            elif call == "Exists":
                expect(isinstance(answer.get("Exists"), bool), f"{where}: {answer}")
            elif call == "GetMetadata":
                meta = answer["Metadata"]
                expect(meta.get("UpperDir") == os.path.join(home, layer, "diff"), f"{where}: {meta}")
            elif call == "ApplyDiff":
                expect(isinstance(answer.get("Size"), int) and answer["Size"] >= 0, f"{where}: {answer}")
                diff = os.path.join(home, layer, "diff")
                for name in tar_names:
                    if name in (".", "./"):
                        continue
                    expect(os.path.lexists(os.path.join(diff, name)), f"{where}: {name} not applied")
            elif call == "Changes":
                got = sorted((c["Path"], c["Kind"]) for c in answer["Changes"])
                want = sorted((c["Path"], c["Kind"]) for c in rec["resp"]["Changes"])
                expect(got == want, f"{where}: Changes {got}, dockerd saw {want}")
            elif call == "DiffSize":
                expect(isinstance(answer.get("Size"), int) and answer["Size"] >= 0, f"{where}: {answer}")
        expect(replayed > 60, f"only {replayed} requests replayed")
        # Everything Got was Put: nothing may be mounted under the home.
        with open("/proc/self/mountinfo") as f:
            left = [l.split()[4] for l in f if l.split()[4].startswith(home + "/")]
        expect(not left, f"mounts left behind: {left}")
        # Every mount and unmount of the replay was an event line.
        time.sleep(0.2)
        events = []
        for line in b"".join(events_raw).split(b"\n"):
            line = line.strip()
            if line.startswith(b"{"):
                events.append(json.loads(line))
        kinds = {(e.get("type"), e.get("layer")) for e in events}
        layer = "4a02567c50e55e618aeadfc3a32d02888e29698c00d03a2d0f3b18e1e12d6c0b-init"
        expect(("mount", layer) in kinds and ("unmount", layer) in kinds,
               f"no mount/unmount events for {layer}: {sorted(kinds)[:10]}")
        expect(sum(1 for e in events if e.get("type") == "mount") ==
               sum(1 for e in events if e.get("type") == "unmount"),
               "every mount event has its unmount")
        expect(all(isinstance(e.get("time"), (int, float)) for e in events), "events carry a time")
        print(f"replayed {replayed} requests: every answer had dockerd's shape, state as expected")
    except Failure as e:
        log.flush()
        print("FAIL:", e)
        print(open(os.path.join(work, "layerd.log")).read()[-4000:])
        return 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = -9
        with open("/proc/self/mountinfo") as f:
            for l in f:
                if l.split()[4].startswith(work + "/"):
                    subprocess.run(["umount", "-l", l.split()[4]])
        shutil.rmtree(work, ignore_errors=True)
        if rc != 0:
            print(f"FAIL: layerd exited with {rc} on SIGTERM")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
