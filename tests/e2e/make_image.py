#!/usr/bin/env python3
"""Writes a `docker save`-format image tarball (manifest.json, config, one layer.tar per layer)
that `docker load` accepts, so the end-to-end test and the benchmark need no registry.

usage:
  make_image.py layers OUT.tar TAG BUSYBOX   three layers that exercise whiteouts (see below)
  make_image.py files OUT.tar TAG BUSYBOX N  busybox layer + one layer of N files of 200 bytes
                                             in directories of 200 files (/many/dNNN/fNNNNN)
"""
import hashlib
import io
import json
import os
import sys
import tarfile

MTIME = 1700000000


def add_dir(tar, name, mode=0o755):
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = mode
    info.mtime = MTIME
    tar.addfile(info)


def add_file(tar, name, data, mode=0o644):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = MTIME
    tar.addfile(info, io.BytesIO(data))


def add_symlink(tar, name, target):
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    info.mode = 0o777
    info.mtime = MTIME
    tar.addfile(info)


def busybox_layer(tar, busybox):
    """A busybox root: /bin/busybox, a symlink per applet, /etc, /tmp."""
    for d in ("bin", "etc", "tmp", "root"):
        add_dir(tar, d, 0o1777 if d == "tmp" else 0o755)
    with open(busybox, "rb") as f:
        add_file(tar, "bin/busybox", f.read(), 0o755)
    applets = os.popen(f"{busybox} --list").read().split()
    for applet in sorted(set(applets)):
        if applet != "busybox":
            add_symlink(tar, "bin/" + applet, "busybox")
    add_file(tar, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    add_file(tar, "etc/group", b"root:x:0:\n")


def layer_bytes(fill, *args):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        fill(tar, *args)
    return buf.getvalue()


def write_image(out, tag, layers):
    """layers: list of uncompressed layer tar bytes, base first."""
    diff_ids = ["sha256:" + hashlib.sha256(b).hexdigest() for b in layers]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2023-11-14T22:13:20Z", "created_by": f"make_image.py layer {i}"}
                    for i in range(len(layers))],
        "created": "2023-11-14T22:13:20Z",
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    layer_paths = [f"{d[len('sha256:'):]}/layer.tar" for d in diff_ids]
    manifest = [{"Config": config_name, "RepoTags": [tag], "Layers": layer_paths}]
    with tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as tar:
        for path, data in zip(layer_paths, layers):
            add_dir(tar, os.path.dirname(path))
            add_file(tar, path, data)
        add_file(tar, config_name, config_bytes)
        add_file(tar, "manifest.json", json.dumps(manifest).encode())


def whiteout_layers(busybox):
    def layer1(tar):
        busybox_layer(tar, busybox)
        add_dir(tar, "l1")
        add_file(tar, "l1/one.txt", b"from layer 1\n")
        add_file(tar, "l1/gone.txt", b"deleted by layer 2\n")
        add_dir(tar, "l1/opaque")
        add_file(tar, "l1/opaque/old.txt", b"hidden by layer 2's opaque marker\n")
        add_dir(tar, "l1/dir")
        add_file(tar, "l1/dir/inside.txt", b"a directory that layer 2 replaces by a file\n")

    def layer2(tar):
        add_dir(tar, "l1")
        add_file(tar, "l1/.wh.gone.txt", b"")
        add_dir(tar, "l1/opaque")
        add_file(tar, "l1/opaque/.wh..wh..opq", b"")
        add_file(tar, "l1/opaque/new.txt", b"from layer 2, in the opaque directory\n")
        # A directory replaced by a file: the file alone hides the lower directory (no whiteout,
        # as Docker's own diffs write it).
        add_file(tar, "l1/dir", b"now a file (layer 2)\n")
        add_dir(tar, "l2")
        add_file(tar, "l2/two.txt", b"from layer 2\n", 0o600)
        add_symlink(tar, "l2/link", "../l1/one.txt")

    def layer3(tar):
        add_dir(tar, "l3")
        add_file(tar, "l3/three.txt", b"from layer 3\n")
        add_dir(tar, "l1")
        add_file(tar, "l1/one.txt", b"from layer 1, rewritten by layer 3\n")

    return [layer_bytes(layer1), layer_bytes(layer2), layer_bytes(layer3)]


def many_files_layers(busybox, count):
    def files(tar):
        add_dir(tar, "many")
        for i in range(count):
            if i % 200 == 0:
                add_dir(tar, f"many/d{i // 200:03d}")
            body = (f"file {i:05d} ".encode() * 20)[:200]
            add_file(tar, f"many/d{i // 200:03d}/f{i:05d}", body)

    return [layer_bytes(busybox_layer, busybox), layer_bytes(files)]


def main():
    if len(sys.argv) == 5 and sys.argv[1] == "layers":
        write_image(sys.argv[2], sys.argv[3], whiteout_layers(sys.argv[4]))
    elif len(sys.argv) == 6 and sys.argv[1] == "files":
        write_image(sys.argv[2], sys.argv[3], many_files_layers(sys.argv[4], int(sys.argv[5])))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
