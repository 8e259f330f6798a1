#!/usr/bin/env python3
"""Servers the lookup specs talk to, on loopback, for what no Debian
package can play: a TCP line server whose answers the test holds back and
releases, and a DNS responder for the failure cases (SERVFAIL, silence, a
late answer). Stdlib only; started and stopped by pid by the specs.

  lookup_servers.py tcp PORTFILE     line server; prints its port to PORTFILE
  lookup_servers.py dns PORTFILE     UDP DNS responder
  lookup_servers.py clamd PORTFILE   clamd's INSTREAM and PING, for a scanner
                                     whose signatures cannot be fetched here:
                                     data holding the EICAR test string is
                                     "Eicar-Test-Signature FOUND", else OK

TCP commands (one line each, answers end with CRLF):
  ECHO text        -> text
  HOLD key         -> "released key" once some connection sends RELEASE key
                      (at once if the key was released already: a RELEASE
                      that overtakes its HOLD is kept, never lost)
  RELEASE key      -> "ok"
  NEVER            -> nothing, ever (the connection stays open)
  CLOSE            -> the server closes the connection
  BYTES n          -> n bytes of "x", no newline
  ALL text         -> text, then the server closes
  OPENED           -> how many connections were accepted so far
  CLOSED           -> how many were closed by the peer so far
DNS names (any type is answered for A; a keyword may be any label):
  servfail  SERVFAIL     refused  REFUSED     silent  no answer
  slow      A 192.0.2.1 after 0.3 s           ns.*  NS ns1., ns2.
  anything else: NXDOMAIN
"""
import os
import socket
import struct
import sys
import threading
import time

held = {}            # key -> list of sockets waiting
released = set()     # keys released before (or after) anyone held them
lock = threading.Lock()
stats = {"opened": 0, "closed": 0}


def tcp_client(conn):
    f = conn.makefile("rb")
    try:
        for raw in f:
            line = raw.decode("latin-1").rstrip("\r\n")
            cmd, _, arg = line.partition(" ")
            if cmd == "ECHO":
                conn.sendall((arg + "\r\n").encode("latin-1"))
            elif cmd == "HOLD":
                with lock:
                    now = arg in released
                    if not now:
                        held.setdefault(arg, []).append(conn)
                if now:
                    conn.sendall(("released " + arg + "\r\n").encode())
            elif cmd == "RELEASE":
                with lock:
                    released.add(arg)
                    waiting = held.pop(arg, [])
                for w in waiting:
                    try:
                        w.sendall(("released " + arg + "\r\n").encode())
                    except OSError:
                        pass
                conn.sendall(b"ok\r\n")
            elif cmd == "NEVER":
                pass
            elif cmd == "CLOSE":
                break
            elif cmd == "BYTES":
                conn.sendall(b"x" * int(arg))
            elif cmd == "ALL":
                conn.sendall(arg.encode("latin-1"))
                break
            elif cmd == "OPENED":
                conn.sendall(b"%d\r\n" % stats["opened"])
            elif cmd == "CLOSED":
                conn.sendall(b"%d\r\n" % stats["closed"])
        else:
            with lock:
                stats["closed"] += 1
    except OSError:
        pass
    finally:
        try:
            conn.close()
        except OSError:
            pass


def serve_tcp(portfile):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(128)
    write_port(portfile, s.getsockname()[1])
    while True:
        conn, _ = s.accept()
        with lock:
            stats["opened"] += 1
        threading.Thread(target=tcp_client, args=(conn,), daemon=True).start()


def dns_reply(q, rcode, answers):
    tid, flags = struct.unpack(">HH", q[:4])
    end = 12
    while q[end] != 0:
        end += q[end] + 1
    question = q[12:end + 5]
    hdr = struct.pack(">HHHHHH", tid, 0x8180 | (flags & 0x0100) | rcode, 1,
                      len(answers), 0, 0)
    return hdr + question + b"".join(answers)


def rr(rtype, rdata):
    return struct.pack(">HHHIH", 0xC00C, rtype, 1, 60, len(rdata)) + rdata


def dname(name):
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"


def serve_dns(portfile):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    write_port(portfile, s.getsockname()[1])
    while True:
        q, peer = s.recvfrom(512)
        labels, i = [], 12
        while q[i] != 0:
            labels.append(q[i + 1:i + 1 + q[i]].decode("latin-1").lower())
            i += q[i] + 1
        # a keyword anywhere in the name (DNSBL queries prefix the zone)
        kinds = [l for l in labels if l in ("silent", "servfail", "refused", "slow")]
        first = kinds[0] if kinds else (labels[0] if labels else "")
        if first == "silent":
            continue
        if first == "servfail":
            out = dns_reply(q, 2, [])
        elif first == "refused":
            out = dns_reply(q, 5, [])
        elif first == "slow":
            out = dns_reply(q, 0, [rr(1, socket.inet_aton("192.0.2.1"))])
            threading.Timer(0.3, s.sendto, (out, peer)).start()
            continue
        elif first == "ns":
            out = dns_reply(q, 0, [rr(2, dname("ns1.example.test")),
                                   rr(2, dname("ns2.example.test"))])
        else:
            out = dns_reply(q, 3, [])
        s.sendto(out, peer)


EICAR = b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE"


def read_exact(f, n):
    data = f.read(n)
    if len(data) != n:
        raise EOFError
    return data


def clamd_client(conn):
    f = conn.makefile("rb")
    try:
        cmd = b""
        while not cmd.endswith(b"\0") and len(cmd) < 64:
            cmd += read_exact(f, 1)
        if cmd == b"zPING\0":
            conn.sendall(b"PONG\0")
        elif cmd == b"zINSTREAM\0":
            data = b""
            while True:
                n = struct.unpack(">I", read_exact(f, 4))[0]
                if n == 0:
                    break
                data += read_exact(f, n)
            if EICAR in data:
                conn.sendall(b"stream: Eicar-Test-Signature FOUND\0")
            else:
                conn.sendall(b"stream: OK\0")
        else:
            conn.sendall(b"UNKNOWN COMMAND\0")
    except (OSError, EOFError):
        pass
    finally:
        conn.close()


def serve_clamd(portfile):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    write_port(portfile, s.getsockname()[1])
    while True:
        conn, _ = s.accept()
        threading.Thread(target=clamd_client, args=(conn,), daemon=True).start()


def write_port(path, port):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("%d\n" % port)
    os.rename(tmp, path)


if __name__ == "__main__":
    mode, portfile = sys.argv[1], sys.argv[2]
    {"tcp": serve_tcp, "dns": serve_dns, "clamd": serve_clamd}[mode](portfile)
