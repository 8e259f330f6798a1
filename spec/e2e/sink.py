#!/usr/bin/python3
"""Loopback SMTP sink for the end-to-end suite: stores the exact bytes.

Postfix relays every message here.  Each completed transaction becomes one
file OUTDIR/NNNNNN.eml, written atomically (temp file + rename):

    line 1  JSON envelope: {"seq", "helo", "mail", "rcpt": [...]} where
            "mail" and each "rcpt" are the full command arguments as Postfix
            sent them ("<a@b> SIZE=42 RET=HDRS", "<c@d> NOTIFY=NEVER ...")
    rest    the DATA content exactly as received: CRLF kept, dot-stuffing
            removed, the final ".\\r\\n" removed.

It advertises 8BITMIME and DSN so that Postfix passes 8-bit bytes through
unchanged and forwards RET/ENVID/NOTIFY/ORCPT parameters.  No CHUNKING, no
SMTPUTF8, no TLS.

usage: sink.py OUTDIR PORT [PIDFILE]   (binds 127.0.0.1 only)
"""
import asyncio
import json
import os
import sys

SEQ = 0
MAX_LINE = 1 << 20


def write_message(outdir, env, data):
    global SEQ
    SEQ += 1
    env["seq"] = SEQ
    name = os.path.join(outdir, "%06d.eml" % SEQ)
    with open(name + ".tmp", "wb") as f:
        f.write(json.dumps(env).encode() + b"\n")
        f.write(bytes(data))
    os.rename(name + ".tmp", name)
    return SEQ


async def session(reader, writer, outdir):
    helo, mail, rcpt = None, None, []

    async def reply(text):
        writer.write(text.encode() + b"\r\n")
        await writer.drain()

    await reply("220 sink.e2e.test ESMTP luamilter e2e sink")
    while True:
        try:
            raw = await asyncio.wait_for(reader.readline(), 300)
        except (asyncio.TimeoutError, ValueError, ConnectionError):
            break
        if not raw:
            break
        line = raw.decode("latin-1").rstrip("\r\n")
        verb = line[:4].upper()
        if verb == "EHLO":
            helo = line[5:]
            writer.write(b"250-sink.e2e.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                         b"250-DSN\r\n250-ENHANCEDSTATUSCODES\r\n250 SIZE 104857600\r\n")
            await writer.drain()
        elif verb == "HELO":
            helo = line[5:]
            await reply("250 sink.e2e.test")
        elif line.upper().startswith("MAIL FROM:"):
            mail, rcpt = line[10:], []
            await reply("250 2.1.0 sender ok")
        elif line.upper().startswith("RCPT TO:"):
            rcpt.append(line[8:])
            await reply("250 2.1.5 recipient ok")
        elif verb == "DATA":
            if mail is None or not rcpt:
                await reply("503 5.5.1 need MAIL and RCPT")
                continue
            await reply("354 send the message, end with <CRLF>.<CRLF>")
            data = bytearray()
            complete = False
            while True:
                chunk = await reader.readline()
                if not chunk:
                    break
                if chunk == b".\r\n":
                    complete = True
                    break
                if chunk.startswith(b"."):
                    chunk = chunk[1:]
                data += chunk
            if not complete:
                break
            seq = write_message(outdir, {"helo": helo, "mail": mail, "rcpt": rcpt}, data)
            mail, rcpt = None, []
            await reply("250 2.0.0 stored as sink-%d" % seq)
        elif verb == "RSET":
            mail, rcpt = None, []
            await reply("250 2.0.0 reset")
        elif verb == "QUIT":
            await reply("221 2.0.0 bye")
            break
        elif verb == "NOOP":
            await reply("250 2.0.0 ok")
        else:
            await reply("502 5.5.2 command not implemented")
    writer.close()


async def main():
    outdir, port = sys.argv[1], int(sys.argv[2])
    os.makedirs(outdir, exist_ok=True)
    server = await asyncio.start_server(lambda r, w: session(r, w, outdir),
                                        "127.0.0.1", port, limit=MAX_LINE)
    if len(sys.argv) > 3:
        with open(sys.argv[3], "w") as f:
            f.write("%d\n" % os.getpid())
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
