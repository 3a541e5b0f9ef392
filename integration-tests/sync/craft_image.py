#!/usr/bin/env python3
"""Crafts a hostile cache image as an OCI layout, for the import tests: one layer that looks like
jobcachefs made it (the annotations are right) but carries what an attacker would put in a tar.

Usage: craft_image.py KIND OUT_DIR
KIND: dotdot | abs-symlink | rel-symlink-escape | device | huge-claim | hardlink-escape
"""

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile


def sha(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()


def layer(kind):
    buf = io.BytesIO()
    t = tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT)

    def add(name, typ=tarfile.REGTYPE, data=b"", **kw):
        ti = tarfile.TarInfo(name)
        ti.type = typ
        ti.size = len(data) if typ == tarfile.REGTYPE else 0
        for k, v in kw.items():
            setattr(ti, k, v)
        t.addfile(ti, io.BytesIO(data) if typ == tarfile.REGTYPE else None)

    add("ok", data=b"harmless\n")
    if kind == "dotdot":
        add("../../etc/cron.d/evil", data=b"* * * * * root id\n")
    elif kind == "abs-symlink":
        add("passwd", tarfile.SYMTYPE, linkname="/etc/passwd")
    elif kind == "rel-symlink-escape":
        add("a/b", tarfile.SYMTYPE, linkname="../../../etc")
    elif kind == "device":
        add("mem", tarfile.CHRTYPE, devmajor=1, devminor=1)
    elif kind == "hardlink-escape":
        add("shadow", tarfile.LNKTYPE, linkname="../../etc/shadow")
    elif kind == "huge-claim":
        # A header claiming 1 TiB, followed by a few blocks only: a reader that trusted the
        # claim would size an image for it.
        ti = tarfile.TarInfo("huge")
        ti.size = 1 << 40
        t.fileobj.write(ti.tobuf(tarfile.PAX_FORMAT))
        t.fileobj.write(b"\0" * 8192)
        t.offset += 0
        t.closed = True
        buf.write(b"\0" * 1024)
        return buf.getvalue()
    else:
        sys.exit(f"unknown kind {kind}")
    t.close()
    return buf.getvalue()


def main():
    kind, out = sys.argv[1], sys.argv[2]
    os.makedirs(os.path.join(out, "blobs", "sha256"), exist_ok=True)

    def put(b):
        d = sha(b)
        with open(os.path.join(out, "blobs", "sha256", d[7:]), "wb") as f:
            f.write(b)
        return d

    raw = layer(kind)
    gz = subprocess.run(["zstd", "-q", "-c"], input=raw, capture_output=True, check=True).stdout
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [sha(raw)]},
    }).encode()
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": put(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+zstd",
                    "digest": put(gz), "size": len(gz),
                    "annotations": {"io.jobcachefs.layer.id": "evil-" + kind}}],
        "annotations": {"io.jobcachefs.generation": "1"},
    }).encode()
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": put(manifest), "size": len(manifest),
        "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(out, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')


if __name__ == "__main__":
    main()
