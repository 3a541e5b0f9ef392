#!/usr/bin/env python3
"""A stand-in for the Kubernetes API server in the hook's tests (no API server can run here).

Serves recorded objects over HTTPS, the way the API does: GET <api path> answers the JSON file
<root>/<api path>.json with 200, or a `Status` object with 404 (NotFound) when there is none, or
401 when the bearer token is wrong. Faults are injected per path through <root>/faults.json
({"<api path>": [500, 500]}: the next two requests of that path answer 500; a key
"PATCH <api path>" injects into that verb only; a code of 0 means "hang for 30 s"). Every request is appended to <root>/requests.log as "<METHOD> <path> <code>".

Writes, as the API does them for the objects the hook keeps (the table of cache GIDs): POST to a
collection creates <collection>/<name>.json (409 AlreadyExists if it exists); PUT replaces an
object only if the body's metadata.resourceVersion is the stored one (409 Conflict otherwise)
and bumps it. Faults apply to writes too (a 409 in faults.json forces a conflict).

PATCH with `Content-Type: application/merge-patch+json` merges the body into the object (RFC 7386:
null removes a key); a metadata.resourceVersion in the patch is a precondition (409 when stale),
as the API server treats it. GET of a collection (a directory of objects) answers a List of its
objects, filtered by `labelSelector` terms of the forms `key` and `key=value`.

Usage: server.py --root DIR --cert CRT --key KEY --token TOKEN --port-file FILE
(binds 127.0.0.1 on a free port and writes the port to FILE once listening).
"""

import argparse
import urllib.parse
import json
import os
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.RLock()
# A write without a resourceVersion precondition.
ANY = object()


def status(code, reason, message, details=None):
    obj = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        obj["details"] = details
    return obj


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body in one send: unbuffered, they go out as two segments, and Nagle's
    # algorithm against the client's delayed ACK holds the second for 40 ms.
    wbufsize = 1 << 16

    def log_message(self, fmt, *args):  # quiet: the request log is the record
        pass

    def answer(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        with LOCK, open(os.path.join(self.server.root, "requests.log"), "a") as log:
            log.write(f"{self.command} {self.path} {code}\n")

    def next_fault(self, path):
        faults_path = os.path.join(self.server.root, "faults.json")
        with LOCK:
            try:
                with open(faults_path) as f:
                    faults = json.load(f)
            except FileNotFoundError:
                return None
            # "<METHOD> <path>" (one verb) before "<path>" (every verb).
            key = next((k for k in (f"{self.command} {path}", path) if faults.get(k)), None)
            if key is None:
                return None
            code = faults[key].pop(0)
            with open(faults_path, "w") as f:
                json.dump(faults, f)
            return code

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if self.headers.get("Authorization") != "Bearer " + self.server.token:
            return self.answer(401, status(401, "Unauthorized", "Unauthorized"))
        fault = self.next_fault(path)
        if fault == 0:
            time.sleep(30)
            return self.answer(504, status(504, "Timeout", "hung"))
        if fault:
            return self.answer(
                fault, status(fault, "InternalError", "Internal error occurred: injected")
            )
        parts = [p for p in path.split("/") if p]
        if ".." in parts or not parts:
            return self.answer(400, status(400, "BadRequest", f"bad path {path}"))
        file = os.path.join(self.server.root, *parts) + ".json"
        if os.path.isfile(file):
            with open(file) as f:
                return self.answer(200, json.load(f))
        folder = os.path.join(self.server.root, *parts)
        if os.path.isdir(folder):
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            terms = [t for t in ",".join(query.get("labelSelector", [])).split(",") if t]
            items = []
            for entry in sorted(os.listdir(folder)):
                if not entry.endswith(".json"):
                    continue
                with LOCK, open(os.path.join(folder, entry)) as f:
                    obj = json.load(f)
                labels = obj.get("metadata", {}).get("labels") or {}
                if all(selects(labels, t) for t in terms):
                    items.append(obj)
            return self.answer(
                200,
                {"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items},
            )
        kind, name = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", parts[-1])
        group = "storage.k8s.io" if parts[0] == "apis" and len(parts) > 1 and parts[1] == "storage.k8s.io" else ""
        details = {"name": name, "kind": kind}
        if group:
            details["group"] = group
        qualified = f"{kind}.{group}" if group else kind
        return self.answer(
            404, status(404, "NotFound", f'{qualified} "{name}" not found', details)
        )


    def read_body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"{}")

    def write_common(self):
        path = self.path.split("?", 1)[0]
        if self.headers.get("Authorization") != "Bearer " + self.server.token:
            self.answer(401, status(401, "Unauthorized", "Unauthorized"))
            return None
        fault = self.next_fault(path)
        if fault:
            self.read_body()
            self.answer(fault, status(fault, "Conflict", "injected"))
            return None
        parts = [p for p in path.split("/") if p]
        if ".." in parts or not parts:
            self.answer(400, status(400, "BadRequest", f"bad path {path}"))
            return None
        return parts

    def do_POST(self):
        parts = self.write_common()
        if parts is None:
            return
        obj = self.read_body()
        name = obj.get("metadata", {}).get("name", "")
        file = os.path.join(self.server.root, *parts, name) + ".json"
        with LOCK:
            if os.path.isfile(file):
                return self.answer(409, status(409, "AlreadyExists", f'"{name}" already exists'))
            obj.setdefault("metadata", {})["resourceVersion"] = "1"
            os.makedirs(os.path.dirname(file), exist_ok=True)
            with open(file, "w") as f:
                json.dump(obj, f)
        return self.answer(201, obj)

    def do_PATCH(self):
        parts = self.write_common()
        if parts is None:
            return
        if self.headers.get("Content-Type") != "application/merge-patch+json":
            self.read_body()
            return self.answer(415, status(415, "UnsupportedMediaType", "only merge patches here"))
        patch = self.read_body()
        wanted = patch.get("metadata", {}).get("resourceVersion", ANY)
        return self.update(parts, lambda stored: merge(stored, patch), wanted)

    def do_PUT(self):
        parts = self.write_common()
        if parts is None:
            return
        obj = self.read_body()
        return self.update(parts, lambda _: obj, obj.get("metadata", {}).get("resourceVersion"))

    def update(self, parts, new_of, wanted):
        """Replaces the stored object by new_of(stored) if `wanted` is its resourceVersion (ANY:
        whatever it is), bumping the version, as the API server does."""
        file = os.path.join(self.server.root, *parts) + ".json"
        with LOCK:
            if not os.path.isfile(file):
                return self.answer(404, status(404, "NotFound", "not found"))
            with open(file) as f:
                stored = json.load(f)
            have = stored.get("metadata", {}).get("resourceVersion")
            if wanted is not ANY and wanted != have:
                return self.answer(409, status(409, "Conflict", "the object has been modified"))
            obj = new_of(stored)
            obj.setdefault("metadata", {})["resourceVersion"] = str(int(have or "0") + 1)
            # Readers do not take the lock: they see the old file or the new one.
            tmp = file + ".tmp"
            with open(tmp, "w") as f:
                json.dump(obj, f)
            os.rename(tmp, file)
        return self.answer(200, obj)


def selects(labels, term):
    if "=" in term:
        k, v = term.split("=", 1)
        return labels.get(k) == v
    return term in labels


def merge(target, patch):
    """RFC 7386."""
    if not isinstance(patch, dict):
        return patch
    if not isinstance(target, dict):
        target = {}
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        else:
            target[k] = merge(target.get(k), v)
    return target


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--port-file", required=True)
    a = ap.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.root = a.root
    server.token = a.token
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(a.cert, a.key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    tmp = a.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(server.server_address[1]))
    os.rename(tmp, a.port_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
