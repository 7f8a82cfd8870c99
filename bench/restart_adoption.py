#!/usr/bin/env python3
"""Time from layerd's start to serving when it adopts N live mounts (issue 6's figure).

usage: bench/restart_adoption.py LAYERD [N=500] [ROUNDS=3]   (root; /dev/shm as the store)
Mounts N read-write layers (one Get each), stops layerd with SIGTERM (mounts stay), starts it
again and measures how long until /v1/health answers, then checks every layer was adopted with
its refcount. Prints one line per round and the median.
"""
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "integration"))
import crash_test as ct  # noqa: E402  (the test's small HTTP client and daemon wrapper)


def main():
    ct.LAYERD = os.path.realpath(sys.argv[1])
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 500
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    work = tempfile.mkdtemp(prefix="layerd-adopt-", dir="/dev/shm")
    d = ct.Daemon(work)
    try:
        d.start()
        ct.plugin(d, "Create", ID="base")
        ids = [f"a{i}" for i in range(n)]
        for i in ids:
            ct.plugin(d, "CreateReadWrite", ID=i, Parent="base")
        with ThreadPoolExecutor(64) as pool:
            list(pool.map(lambda i: ct.plugin(d, "Get", ID=i), ids))
        times = []
        for r in range(rounds):
            assert d.kill(signal.SIGTERM) == 0
            started = time.monotonic()
            d.start()  # returns once /v1/health answers
            elapsed = time.monotonic() - started
            state = ct.layers(d)
            adopted = sum(1 for i in ids if state[i]["mounted"] and state[i]["refcount"] == 1)
            assert adopted == n, f"round {r}: {adopted} of {n} adopted"
            times.append(elapsed)
            print(f"round {r + 1}: {n} mounts adopted, start to serving {elapsed * 1000:.0f} ms")
        print(f"median start to serving with {n} adopted mounts: "
              f"{statistics.median(times) * 1000:.0f} ms (min {min(times) * 1000:.0f}, "
              f"max {max(times) * 1000:.0f})")
        with ThreadPoolExecutor(64) as pool:
            list(pool.map(lambda i: ct.plugin(d, "Put", ID=i), ids))
        d.kill(signal.SIGTERM)
    finally:
        for pid in ct.fuse_servers_under(work):
            os.kill(pid, signal.SIGKILL)
        for m in reversed(ct.mounts_under(work)):
            subprocess.run(["umount", "-l", m])
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
