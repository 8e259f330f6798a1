"""Machinery of the end-to-end suite (spec/e2e/run.py holds the cases).

Started by scripts/e2e-postfix.sh or scripts/e2e-sendmail.sh, which run a
private MTA (E2E_MTA: postfix, the default, or sendmail) and the sink and
pass their coordinates in E2E_* variables.  This module starts and reloads
luamilter, sends SMTP sessions (swaks, or a small raw client where swaks
cannot express the session), reads what the sink stored and what is in the
MTA's queue, and checks the logs.  Every wait has a deadline.
"""
import json
import os
import re
import signal
import socket
import subprocess
import time

ENV = os.environ
T = ENV.get("E2E_DIR", "")
CONF = os.path.join(T, "etc")
SINK_DIR = os.path.join(T, "sink")
WORK = os.path.join(T, "work")
MAILLOG = os.path.join(T, "log", "maillog")
BIN = ENV.get("LUAMILTER_BIN", "build/luamilter")
ROOT = ENV.get("E2E_ROOT", ".")
MTA = ENV.get("E2E_MTA", "postfix")
# Sendmail (scripts/e2e-sendmail.sh): its queue directory, .cf, binary and
# the environment its commands need (LD_LIBRARY_PATH, the log shim)
SM_QUEUE = os.path.join(T, "queue")
SM_CF = os.path.join(T, "etc", "sendmail.cf")
SM_BIN = ENV.get("E2E_SM_BIN", "")
SM_PIDFILE = os.path.join(T, "run", "sendmail.pid")

SMTP_PORT = {"unix": int(ENV.get("E2E_SMTP_UNIX", "0")),
             "inet": int(ENV.get("E2E_SMTP_INET", "0"))}
LISTEN = {"unix": "unix:" + os.path.join(T, "run", "luamilter.sock"),
          "inet": "inet:%s@127.0.0.1" % ENV.get("E2E_MILTER_PORT", "0")}
# External-milter mode (scripts/e2e-postfix.sh with E2E_EXTERNAL_MILTER,
# as scripts/deb-install-check.sh runs it): Postfix talks to a luamilter
# the suite did not start (Postfix's notation: unix:/path, inet:host:port),
# whose log is E2E_EXTERNAL_LOG and supervisor E2E_EXTERNAL_PID (optional),
# serving E2E_EXTERNAL_POLICY.  The suite never starts, reloads, signals or
# stops it: a case runs only if the policy it would serve is that file's
# text, byte for byte, and then on the daemon's own options.
EXTERNAL = ENV.get("E2E_EXTERNAL_MILTER", "")
EXTERNAL_LOG = ENV.get("E2E_EXTERNAL_LOG", "")
EXTERNAL_POLICY = ENV.get("E2E_EXTERNAL_POLICY", "/etc/luamilter/policy.lua")
EXTERNAL_PID = ENV.get("E2E_EXTERNAL_PID", "")


class Abort(Exception):
    """A check that makes the rest of the case meaningless."""


def now():
    return time.monotonic()


def poll(fn, timeout, step=0.05):
    """calls fn() until it returns a true value or timeout seconds passed;
    returns the last value"""
    deadline = now() + timeout
    while True:
        v = fn()
        if v or now() >= deadline:
            return v
        time.sleep(step)


def read_from(path, offset):
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def size_of(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def write_file(path, data):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())
    os.rename(tmp, path)


# ---------------------------------------------------------------- luamilter

def children(pid):
    """pids whose parent is pid (from /proc)"""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                st = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces, split after ')'
        fields = st[st.rfind(")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            out.append(int(d))
    return out


def pid_alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            st = f.read()
    except OSError:
        return False
    return st[st.rfind(")") + 2:][:1] != "Z"


class Luamilter:
    """One luamilter daemon (supervisor + workers) serving a policy file,
    reloaded with SIGHUP."""

    seq = 0

    def __init__(self, transport, args=()):
        self.transport = transport
        self.listen = LISTEN[transport]
        self.args = list(args)
        self.script = os.path.join(WORK, "policy-%s.lua" % transport)
        self.log_path = os.path.join(WORK, "luamilter-%s.log" % transport)
        self.proc = None
        self.gen = 0
        self.known = set()   # every pid seen: supervisor and workers
        self.orphans = []

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def workers(self):
        if not self.alive():
            return []
        ws = children(self.proc.pid)
        self._remember(ws)
        return ws

    def pids(self):
        return ([self.proc.pid] if self.alive() else []) + self.workers()

    def _remember(self, pids):
        for p in pids:
            if p not in self.known:
                self.known.add(p)
                Luamilter.seq += 1
                write_file(os.path.join(T, "pids", "luamilter-%d.pid" % Luamilter.seq),
                           "%d\n" % p)

    def leftovers(self):
        """pids of this daemon still running (workers outliving the
        supervisor included)"""
        return sorted(p for p in self.known if pid_alive(p))

    def log_size(self):
        return size_of(self.log_path)

    def log_since(self, offset):
        return read_from(self.log_path, offset)

    def _ready(self):
        if self.listen.startswith("unix:"):
            path = self.listen[5:]
            if not os.path.exists(path):
                return False
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            addr = path
        else:
            port = int(self.listen.split(":")[1].split("@")[0])
            s = socket.socket()
            addr = ("127.0.0.1", port)
        s.settimeout(0.5)
        try:
            s.connect(addr)
            return True
        except OSError:
            return False
        finally:
            s.close()

    def start(self, source=None):
        """starts the daemon (policy source, or the current policy file);
        raises Abort when it does not listen within 10 s"""
        if self.alive():
            raise Abort("luamilter already running")
        if source is not None:
            write_file(self.script, source)
        off = self.log_size()
        # the store beside the policy: the default path (/var/lib/luamilter
        # as root) is the machine's, not the suite's
        argv = [BIN, "-l", self.listen, "--log-level", "info",
                "--store", "lmdb:" + self.script + ".store"]
        if self.transport == "unix" and MTA == "postfix":
            # Postfix's smtpd and cleanup run as user postfix: the socket
            # becomes root:postfix 0660 (the default --socket-mode)
            argv += ["--group", "postfix"]
        argv += self.args + [self.script]
        logf = open(self.log_path, "ab")
        # a process group of its own (its workers inherit it), so that
        # signal_all can signal the whole daemon at once
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                     stderr=subprocess.STDOUT, cwd=WORK,
                                     start_new_session=True)
        logf.close()
        self._remember([self.proc.pid])
        serving = re.compile(r"serving .*\(generation 1\b")
        ok = poll(lambda: not self.alive() or
                  (serving.search(self.log_since(off)) and self._ready()), 10)
        if not self.alive():
            raise Abort("luamilter exited at start (status %s):\n%s" %
                        (self.proc.returncode, self.log_since(off)))
        if not ok:
            raise Abort("luamilter not serving %s after 10 s:\n%s" %
                        (self.listen, self.log_since(off)))
        self.gen = 1
        self.workers()

    def load(self, source):
        """serves source from now on: SIGHUP reload when running (waits for
        the 'reloaded ...: generation N' line), start otherwise"""
        if not self.alive():
            self.start(source)
            return
        write_file(self.script, source)
        off = self.log_size()
        self.proc.send_signal(signal.SIGHUP)
        done = re.compile(r"reloaded .*: generation (\d+)|reload failed|keeps generation")
        poll(lambda: done.search(self.log_since(off)) or not self.alive(), 5)
        text = self.log_since(off)
        m = re.search(r"reloaded .*: generation (\d+)", text)
        if not m or int(m.group(1)) <= self.gen or "keeps generation" in text:
            raise Abort("SIGHUP reload did not report a new generation "
                        "(last was %d):\n%s" % (self.gen, text))
        self.gen = int(m.group(1))

    def restart(self, source):
        """stops the running daemon (if any) and starts one on source"""
        self.orphans = []
        if self.alive():
            self.stop()
        self.start(source)

    def signal(self, sig):
        if self.alive():
            self.proc.send_signal(sig)

    def signal_all(self, sig):
        """sig to the supervisor and every worker at once: to the daemon's
        process group, in one kill(2).  One by one, whichever process got
        it first could see the others go and act on it (a SIGKILLed
        supervisor's workers log "the supervisor is gone", a supervisor
        whose worker died logs it and forks another) before its own signal
        arrived; the kernel also signals a worker forked meanwhile."""
        self.workers()   # remembered for leftovers()
        if self.alive():
            # not reaped yet: the supervisor's pid, hence its group id,
            # cannot have been reused
            try:
                os.killpg(self.proc.pid, sig)
            except OSError:
                pass
            return
        for p in self.leftovers():
            try:
                os.kill(p, sig)
            except OSError:
                pass

    def wait(self, timeout):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout=10):
        """SIGTERM to the supervisor and a bounded wait (SIGKILL after it);
        returns its exit status.  Workers still running afterwards are
        listed in self.orphans and killed."""
        self.orphans = []
        if self.proc is None:
            return None
        self.workers()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if self.wait(timeout) is None:
                self.proc.kill()
                self.wait(5)
        poll(lambda: not self.leftovers(), 5)
        self.orphans = self.leftovers()
        self.kill_leftovers()
        return self.proc.returncode

    def kill_leftovers(self):
        for p in self.leftovers():
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        poll(lambda: not self.leftovers(), 5)


class External:
    """The luamilter of external-milter mode (EXTERNAL), in place of a
    Luamilter: start/restart check that the case's policy is the one it
    serves and do nothing else; whatever would act on the daemon (a reload,
    a signal, a stop within a case) refuses the case with Abort."""

    def __init__(self, transport, args=()):
        self.transport = transport
        self.listen = EXTERNAL
        self.args = list(args)   # the case's options: not applied
        self.script = EXTERNAL_POLICY
        self.log_path = EXTERNAL_LOG
        self.pid = int(EXTERNAL_PID) if EXTERNAL_PID else None
        self.gen = 1
        self.orphans = []
        # what Run.finish reports when alive() is false
        self.proc = type("NotOurs", (), {"returncode": "unknown: not started by the suite"})

    def alive(self):
        if self.pid is not None:
            return pid_alive(self.pid)
        return not EXTERNAL.startswith("unix:") or os.path.exists(EXTERNAL[5:])

    def log_size(self):
        return size_of(self.log_path)

    def log_since(self, offset):
        return read_from(self.log_path, offset)

    def start(self, source=None):
        try:
            with open(self.script, "rb") as f:
                installed = f.read()
        except OSError as e:
            raise Abort("external milter %s: cannot read its policy: %s" % (EXTERNAL, e))
        want = source if isinstance(source, bytes) or source is None else source.encode()
        if want is not None and want != installed:
            raise Abort("refused in external-milter mode: the case serves a policy of its "
                        "own, not %s (which %s serves)" % (self.script, EXTERNAL))
        if not self.alive():
            raise Abort("external milter %s is not running" % EXTERNAL)

    restart = start

    def refuse(self, *_args, **_kw):
        raise Abort("refused in external-milter mode: the case acts on luamilter itself "
                    "(reload, signal, stop)")

    load = signal = signal_all = wait = workers = kill_leftovers = refuse

    def pids(self):
        return []

    def leftovers(self):
        return []

    def stop(self, timeout=10):
        """the suite does not stop a daemon it did not start"""
        return None


def daemon(transport, args=()):
    """the luamilter of a transport's phase: one the suite starts, or the
    external one"""
    if not EXTERNAL:
        return Luamilter(transport, args)
    if MTA != "postfix":
        raise SystemExit("e2e: E2E_EXTERNAL_MILTER is for the Postfix suite only")
    return External(transport, args)


# ---------------------------------------------------------------- SMTP

class Transcript:
    """What the SMTP client saw: a list of [command, reply lines]; command
    "" is the banner and "." the end of DATA."""

    def __init__(self, text=""):
        self.text = text
        self.steps = []
        self.rc = None

    def add(self, cmd):
        self.steps.append([cmd, []])

    def replies(self, prefix):
        """reply line lists of every command starting with prefix
        (case-insensitive)"""
        p = prefix.upper()
        return [r for c, r in self.steps if c.upper().startswith(p)]

    def reply(self, prefix, nth=1):
        rs = self.replies(prefix)
        return rs[nth - 1] if len(rs) >= nth else None

    def __str__(self):
        return self.text


def parse_swaks(out):
    t = Transcript(out)
    t.add("")
    in_data = False
    for line in out.splitlines():
        if line.startswith(" -> "):
            cmd = line[4:]
            if in_data:
                continue
            t.add(cmd)
        elif line.startswith("<-  ") or line.startswith("<** "):
            rep = line[4:]
            t.steps[-1][1].append(rep)
            if t.steps[-1][0].upper() == "DATA" and rep.startswith("354"):
                in_data = True
                t.add(".")
            elif in_data and (len(rep) < 4 or rep[3] != "-"):
                in_data = False
    return t


def swaks(port, sender, rcpts, data=None, helo="client.e2e.test", extra=(),
          timeout=90):
    """one swaks session; data is the exact message bytes (ending in CRLF)"""
    argv = ["swaks", "--server", "127.0.0.1", "--port", str(port),
            "--helo", helo, "--from", sender, "--to", ",".join(rcpts),
            "--timeout", "60", "--suppress-data"]
    if data is not None:
        assert data.endswith(b"\r\n")
        path = os.path.join(WORK, "message.eml")
        # swaks appends CRLF . CRLF after the data: leave the last CRLF off
        # so that exactly `data` is sent
        write_file(path, data[:-2])
        argv += ["--data", "@" + path]
    argv += list(extra)
    try:
        p = subprocess.run(argv, capture_output=True, timeout=timeout)
        out = p.stdout.decode("latin-1") + p.stderr.decode("latin-1")
        rc = p.returncode
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode("latin-1") + "\n=== swaks timed out"
        rc = "timeout"
    out = "\n".join(l for l in out.splitlines() if "DEPRECATION" not in l)
    t = parse_swaks("$ " + " ".join(argv) + "\n" + out)
    t.rc = rc
    return t


class SMTP:
    """A small raw SMTP client for sessions swaks cannot express (several
    messages per connection, RSET); records a swaks-like transcript."""

    def __init__(self, port, timeout=60):
        self.t = Transcript()
        self.lines = ["=== Connected to 127.0.0.1:%d" % port]
        self.s = socket.create_connection(("127.0.0.1", port), timeout)
        self.f = self.s.makefile("rb")
        self.closed = False
        self.t.add("")
        self._read()

    def _read(self):
        out = []
        while True:
            try:
                raw = self.f.readline()
            except OSError as e:
                self.lines.append("=== read failed: %s" % e)
                raw = b""
            if not raw:
                self.lines.append("=== connection closed by server")
                self.closed = True
                break
            line = raw.decode("latin-1").rstrip("\r\n")
            self.lines.append("<-  " + line)
            out.append(line)
            if len(line) < 4 or line[3] != "-":
                break
        self.t.steps[-1][1].extend(out)
        self.t.text = "\n".join(self.lines)
        return out

    def cmd(self, line):
        if self.closed:
            return []
        self.lines.append(" -> " + line)
        self.t.add(line)
        try:
            self.s.sendall(line.encode("latin-1") + b"\r\n")
        except OSError as e:
            self.lines.append("=== send failed: %s" % e)
            self.closed = True
            return []
        return self._read()

    def data(self, message):
        r = self.cmd("DATA")
        if not r or not r[-1].startswith("354"):
            return r
        body = message[:-2] if message.endswith(b"\r\n") else message
        stuffed = b"\r\n".join((b"." + l if l.startswith(b".") else l)
                               for l in body.split(b"\r\n"))
        self.lines.append(" -> (%d bytes of message data)" % len(message))
        self.lines.append(" -> .")
        self.t.add(".")
        self.s.sendall(stuffed + b"\r\n.\r\n")
        return self._read()

    def close(self):
        if not self.closed:
            self.cmd("QUIT")
        self.s.close()
        self.t.text = "\n".join(self.lines)
        return self.t


# ---------------------------------------------------------------- delivery

class Delivered:
    """One message the sink stored."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            raw = f.read()
        env, _, self.raw = raw.partition(b"\n")
        self.env = json.loads(env)
        self.mail = self.env["mail"]
        self.rcpt = self.env["rcpt"]
        end = self.raw.find(b"\r\n\r\n")
        if end < 0:
            self.head, self.body = self.raw, b""
        else:
            self.head, self.body = self.raw[:end + 2], self.raw[end + 4:]
        self.headers = split_headers(self.head)

    def rcpt_addrs(self):
        return [r.split(" ")[0] for r in self.rcpt]

    def mail_addr(self):
        return self.mail.split(" ")[0]

    def header_names(self):
        return [h[0] for h in self.headers]

    def values(self, name):
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def show(self, limit=2500):
        text = self.raw[:limit].decode("latin-1")
        more = "" if len(self.raw) <= limit else "\n... (%d bytes in all)" % len(self.raw)
        return "envelope %s\n%s%s" % (json.dumps(self.env), text, more)


def split_headers(head):
    """[(name, value)] of a header block (bytes, CRLF lines); value is the
    raw bytes after 'Name:' including the leading space and any folded
    lines (joined with CRLF), decoded as latin-1 so bytes survive"""
    out = []
    for line in head.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and out:
            out[-1][1] += "\r\n" + line.decode("latin-1")
            continue
        name, _, value = line.partition(b":")
        out.append([name.decode("latin-1"), value.decode("latin-1")])
    return [tuple(h) for h in out]


def sink_files():
    try:
        return set(x for x in os.listdir(SINK_DIR) if x.endswith(".eml"))
    except OSError:
        return set()


def postqueue():
    try:
        p = subprocess.run(["postqueue", "-c", CONF, "-j"], capture_output=True,
                           timeout=15)
    except subprocess.TimeoutExpired:
        return None
    out = []
    for line in p.stdout.decode("latin-1").splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


def queue():
    """the MTA's queue: [{"queue_id", "queue_name"}], queue_name "hold" for
    held (Postfix) or quarantined (Sendmail) mail, "deferred" for mail a
    delivery attempt failed; None when it cannot be read in time"""
    return postqueue() if MTA == "postfix" else sm_queue()


def queue_delete(qid, hold=False):
    if MTA == "postfix":
        postsuper("-d", qid, "hold") if hold else postsuper("-d", qid)
    else:
        sm_delete(qid)


def maillog_barrier(timeout=5):
    """waits until every line the MTA logged before the call is in MAILLOG"""
    return pf_maillog_barrier(timeout) if MTA == "postfix" else sm_maillog_barrier(timeout)


# ---------------------------------------------------------------- Sendmail

def sm_queue():
    """Sendmail's queue directory: a qf file is a queued message (deferred
    once its N line counts a delivery attempt), an hf file a quarantined
    one"""
    out = []
    try:
        names = os.listdir(SM_QUEUE)
    except OSError:
        return None
    for f in sorted(names):
        if f[:2] not in ("qf", "hf"):
            continue
        kind = "hold" if f.startswith("hf") else "active"
        if kind == "active":
            try:
                with open(os.path.join(SM_QUEUE, f), "rb") as fh:
                    tries = [l for l in fh.read().split(b"\n") if l.startswith(b"N")]
                if tries and tries[0][1:].strip() not in (b"", b"0"):
                    kind = "deferred"
            except OSError:
                continue   # delivered meanwhile
        out.append({"queue_id": f[2:], "queue_name": kind, "file": f})
    return out


def sm_delete(qid):
    for f in os.listdir(SM_QUEUE):
        if f[2:] == qid:
            try:
                os.unlink(os.path.join(SM_QUEUE, f))
            except OSError:
                pass


def sm_env():
    """the environment of Sendmail's commands: the script's (its
    LD_LIBRARY_PATH) and the shim, which the driver runs without"""
    env = dict(ENV)
    if ENV.get("E2E_SM_PRELOAD"):
        env["LD_PRELOAD"] = ENV["E2E_SM_PRELOAD"]
    return env


def sendmail_cmd(*args, timeout=20, data=None):
    """runs the private Sendmail binary with its .cf (queue commands,
    quarantine release); returns the CompletedProcess"""
    return subprocess.run([SM_BIN, "-C", SM_CF] + list(args), input=data,
                          capture_output=True, timeout=timeout, env=sm_env(),
                          cwd=SM_QUEUE)


def sm_qf(qid):
    """the queue control file (qf or hf) of qid, as text ("" if none)"""
    for pre in ("hf", "qf"):
        path = os.path.join(SM_QUEUE, pre + qid)
        if os.path.exists(path):
            return read_from(path, 0)
    return ""


def sm_daemon_pid():
    try:
        with open(SM_PIDFILE) as f:
            return int(f.readline().strip())
    except (OSError, ValueError):
        return None


def sm_maillog_barrier(timeout=5):
    """Sendmail's processes write their own log lines (the shim appends
    each at once): once no child of the daemon runs (SMTP sessions and the
    deliveries they started), everything they logged is in MAILLOG"""
    pid = sm_daemon_pid()
    if pid is None:
        return False
    return bool(poll(lambda: not children(pid), timeout, 0.05))


# ---------------------------------------------------------------- Postfix

_barriers = [0]


def pf_maillog_barrier(timeout=5):
    """waits until every line Postfix logged before the call is in MAILLOG;
    returns False after timeout seconds.  Postfix's programs send their
    log lines to postlogd as datagrams and postlogd writes them in the
    order they arrived, a little later: a line sent now with postlog(1)
    is written after all of them."""
    _barriers[0] += 1
    mark = "e2e log barrier %d.%d" % (os.getpid(), _barriers[0])
    off = size_of(MAILLOG)
    try:
        subprocess.run(["postlog", "-c", CONF, "-t", "e2e-barrier", "-p", "info", mark],
                       capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return bool(poll(lambda: mark in read_from(MAILLOG, off), timeout, 0.01))


def postsuper(*args):
    subprocess.run(["postsuper", "-c", CONF] + list(args), capture_output=True,
                   timeout=15)


def postcat(qid):
    p = subprocess.run(["postcat", "-c", CONF, "-q", qid], capture_output=True,
                       timeout=15)
    return p.stdout.decode("latin-1")


def mail_message(sender_hdr="Sender <sender@example.test>", to_hdr="rcpt1@example.test",
                 subject="e2e", msgid="e2e@example.test", extra=(), body=None,
                 date="Thu, 01 Jan 2026 00:00:00 +0000"):
    """message bytes with CRLF line ends; extra: header lines (bytes or str)"""
    hs = [b"Date: " + date.encode(),
          b"From: " + sender_hdr.encode(),
          b"To: " + to_hdr.encode(),
          b"Subject: " + subject.encode(),
          b"Message-ID: <" + msgid.encode() + b">"]
    hs += [h if isinstance(h, bytes) else h.encode("utf-8") for h in extra]
    if body is None:
        body = b"Hello from the luamilter e2e suite.\r\n"
    return b"\r\n".join(hs) + b"\r\n\r\n" + body


def lines_matching(text, regex):
    r = re.compile(regex)
    return [l for l in text.splitlines() if r.search(l)]
