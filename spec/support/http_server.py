#!/usr/bin/env python3
"""The HTTP(S) server the milter.http specs talk to, on loopback. Stdlib
only; started and stopped by pid by spec/support/http_servers.lua.

  http_server.py PORTFILE [CERT KEY]   HTTPS with CERT/KEY, else HTTP

Paths (the query string is ignored; a proxied request's absolute URL is
routed by its path):
  /echo           200, JSON {method, path, headers: [[name, value]...], body}
  /status/N       status N, body "status N"
  /headers        200 with X-Multi twice, X-Mixed-Case once
  /big/N          N bytes of "x" with a Content-Length
  /stream/N       N bytes of "x" with no length (connection closes)
  /never          reads the request, never answers
  /hold/KEY       answers "released KEY" once someone requests /release/KEY
  /release/KEY    "ok"
  /redirect       302 to /echo
"""
import json
import os
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

held = {}  # key -> threading.Event
lock = threading.Lock()


def event(key):
    with lock:
        return held.setdefault(key, threading.Event())


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        sys.stderr.write("%s\n" % (fmt % args))

    def reply(self, status, body, ctype="text/plain", extra=()):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def route(self):
        path = urlsplit(self.path).path
        data = self.body()
        parts = path.strip("/").split("/")
        if path == "/echo":
            out = {"method": self.command, "path": self.path,
                   "headers": [[k, v] for k, v in self.headers.items()],
                   "body": data.decode("latin-1")}
            self.reply(200, json.dumps(out).encode(), "application/json")
        elif parts[0] == "status":
            n = int(parts[1])
            self.reply(n, b"status %d" % n)
        elif path == "/headers":
            self.reply(200, b"h", extra=[("X-Multi", "a"), ("X-Multi", "b"),
                                         ("X-Mixed-Case", " padded  ")])
        elif parts[0] == "big":
            self.reply(200, b"x" * int(parts[1]))
        elif parts[0] == "stream":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"x" * int(parts[1]))
            self.close_connection = True
        elif path == "/never":
            while True:
                time.sleep(3600)
        elif parts[0] == "hold":
            event(parts[1]).wait()
            self.reply(200, ("released " + parts[1]).encode())
        elif parts[0] == "release":
            event(parts[1]).set()
            self.reply(200, b"ok")
        elif path == "/redirect":
            self.reply(302, b"moved", extra=[("Location", "/echo")])
        else:
            self.reply(404, b"no such path")

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = route


def main():
    portfile = sys.argv[1]
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    if len(sys.argv) > 3:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(sys.argv[2], sys.argv[3])
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    tmp = portfile + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(srv.server_address[1]))
    os.rename(tmp, portfile)
    srv.serve_forever()


if __name__ == "__main__":
    main()
