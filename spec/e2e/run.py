#!/usr/bin/python3
"""End-to-end cases: real Postfix -> luamilter -> sink.  Run through
scripts/e2e-postfix.sh, which sets up Postfix and the sink first.

    run.py [CASE-PREFIX ...]     E2E_TRANSPORTS="unix inet" (default)

A CASE-PREFIX runs every case whose name starts with it; one ending in $
runs the case of exactly that name ('accept$' runs accept, not
accept-connect).

Each case is run once with Postfix talking to luamilter over a unix socket
and once over TCP.  A case writes a policy and starts a fresh luamilter on
it (the reload cases also use SIGHUP), sends mail with swaks (or a raw SMTP
client where swaks cannot express the session), and checks what the SMTP
client saw and the exact bytes the sink received.  After every case the
runner also checks that nothing else was delivered, that Postfix's queue is
empty (but for mail the case itself put on hold), that luamilter is still
running, and that neither luamilter's log nor Postfix's log has a warning
or error the case did not expect.  One PASS/FAIL line per case; the exit
status is 1 when any case failed.
"""
import os
import re
import signal
import subprocess
import sys
import time
import traceback

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
from harness import Abort, mail_message  # noqa: E402

PRELUDE = 'local milter = require "milter"\nlocal H = {}\n'


def lua(body):
    return PRELUDE + body + "\nreturn H\n"


# Postfix's texts when the milter is unavailable (milter_default_action =
# tempfail) and luamilter's generic handler-failure reply.
PF_TEMPFAIL = ["451 4.7.1 Service unavailable - try again later"]
LM_ONERROR = ["451 4.3.0 Temporary mail filter failure, try again later"]
PF_MILTER_DOWN = r"warning: connect to Milter service .*(No such file|Connection refused)"
# Sendmail's: its text for a milter's plain tempfail, also given when the
# milter is unavailable (F=T); and what it logs when it cannot connect
SM_TEMPFAIL = ["451 4.3.2 Please try again later"]
SM_MILTER_DOWN = (r"err: .*Milter \(luamilter_\w+\): (local socket name .* unsafe|"
                  r"error connecting to filter: Connection refused)")
# --script-timeout 3: a runaway handler is answered (at worst by the
# watchdog, script-timeout + 1 s later) before milter_command_timeout (5 s)
BASE_ARGS = {"--shutdown-timeout": "5", "--script-timeout": "3"}


def daemon_args(extra=None):
    opts = dict(BASE_ARGS, **(extra or {}))
    return [x for kv in sorted(opts.items()) for x in kv]

# ------------------------------------------------------------------ runner

CASES = []
# cases about luamilter itself (reloads, crashes, timeouts) and Postfix's
# own features, run on Postfix only: Sendmail's suite runs the verdict and
# modification matrix, where the MTA makes the difference
PF_ONLY = ("postfix",)


def case(name, transports=("unix", "inet"), mtas=("postfix", "sendmail"), known=None):
    """a case, run on each transport for each MTA of mtas; known: {mta:
    "KNOWN: what is wrong"} for a defect of luamilter's that the case shows
    on that MTA: its failure is reported as KNOWN (with the details), and
    its passing is a FAIL until the marker is removed"""
    def deco(fn):
        CASES.append((name, fn, transports, mtas, known or {}))
        return fn
    return deco


class Run:
    """One case on one transport."""

    def __init__(self, name, transport, lm):
        self.name, self.transport, self.lm = name, transport, lm
        self.port = h.SMTP_PORT[transport]
        self.fails = []
        self.diag = []
        self.allow_lm = []      # regexes: WARN/ERROR luamilter lines expected
        self.allow_pf = []      # regexes: MTA log warnings expected
        self.mta = h.MTA
        self.sink0 = h.sink_files()
        self.lm_off = lm.log_size()
        self.pf_off = h.size_of(h.MAILLOG)
        q = h.queue() or []
        self.held0 = set(x["queue_id"] for x in q if x.get("queue_name") == "hold")

    # -- checks
    def check(self, cond, what):
        if not cond:
            self.fails.append(what)
        return cond

    def eq(self, got, want, what):
        return self.check(got == want, "%s:\n      expected %r\n      got      %r" %
                          (what, want, got))

    def reply(self, tr, cmd, want, nth=1):
        """the reply lines to the nth command starting with cmd are exactly want"""
        return self.eq(tr.reply(cmd, nth), want, "reply to %r" % cmd)

    def reply_code(self, tr, cmd, code, nth=1):
        r = tr.reply(cmd, nth)
        return self.check(r and all(l[:3] == code for l in r),
                          "reply to %r: expected code %s, got %r" % (cmd, code, r))

    # -- actions
    def policy(self, body, raw=False, args=None):
        """serves this policy from a freshly started luamilter; args: extra
        or overriding options, {"--option": "value"}"""
        self.lm.args = daemon_args(args)
        self.lm.restart(body if raw else lua(body))
        if self.lm.orphans:
            self.fails.append("luamilter processes %r outlived SIGTERM" % self.lm.orphans)
        self.lm_off = self.lm.log_size()

    def reload(self, body):
        """SIGHUP reload of the running luamilter"""
        self.lm.load(lua(body))

    def swaks(self, sender, rcpts, data=None, **kw):
        tr = h.swaks(self.port, sender, rcpts, data, **kw)
        self.diag.append(("SMTP transcript (swaks rc=%s)" % tr.rc, tr.text))
        return tr

    def smtp(self):
        return h.SMTP(self.port)

    def record(self, tr):
        self.diag.append(("SMTP transcript", tr.text))
        return tr

    def drain(self, timeout=30):
        """waits until Postfix's queue holds nothing but held mail;
        returns the entries left (empty on success)"""
        def pending():
            q = h.queue()
            if q is None:
                return [{"queue_name": "?", "queue_id": "the queue could not be read"}]
            return [x for x in q if x.get("queue_name") != "hold"]
        left = []

        def done():
            left[:] = pending()
            return not left or any(x.get("queue_name") == "deferred" for x in left)
        h.poll(done, timeout, 0.1)
        return left

    def delivered(self, n, timeout=30):
        """waits for the queue to drain and returns the messages the sink
        got since the case started (or the last call); n is the number
        expected"""
        left = self.drain(timeout)
        if left:
            self.fails.append("%s queue not empty after %ds: %r" % (MTA_NAME[self.mta], timeout, left))
        # the sink stores a message before it answers 250, and Postfix
        # removes the queue file only after that 250: a drained queue means
        # every delivery is on disk
        new = sorted(h.sink_files() - self.sink0)
        self.sink0 |= set(new)
        msgs = [h.Delivered(os.path.join(h.SINK_DIR, x)) for x in new]
        for m in msgs:
            self.diag.append(("delivered %s" % os.path.basename(m.path), m.show()))
        self.eq(len(msgs), n, "number of messages delivered to the sink")
        if len(msgs) != n:
            raise Abort("wrong number of deliveries")
        return msgs

    def held(self):
        q = h.queue() or []
        return [x for x in q if x.get("queue_name") == "hold"
                and x["queue_id"] not in self.held0]

    def wait_lm_log(self, text, timeout=10):
        return h.poll(lambda: text in self.lm.log_since(self.lm_off), timeout)

    # -- after the case
    def finish(self):
        # nothing more may arrive: no stray bounce, no second copy
        left = self.drain(10)
        if left:
            self.fails.append("%s queue not empty after the case: %r" % (MTA_NAME[self.mta], left))
        for x in sorted(h.sink_files() - self.sink0):
            m = h.Delivered(os.path.join(h.SINK_DIR, x))
            self.fails.append("unexpected delivery %s" % x)
            self.diag.append(("unexpected delivery %s" % x, m.show()))
        self.sink0 = h.sink_files()
        for x in self.held():
            self.fails.append("message %s left on hold" % x["queue_id"])
            h.queue_delete(x["queue_id"], hold=True)
        for x in self.drain(0) if self.fails else []:
            # keep later cases clean: nothing may stay queued
            h.queue_delete(x["queue_id"])
        if not self.lm.alive():
            self.fails.append("luamilter is not running after the case (status %s)" %
                              self.lm.proc.returncode)
        lm_log = self.lm.log_since(self.lm_off)
        for line in h.lines_matching(lm_log, r"^\S+ (WARN|ERROR) "):
            if not any(re.search(a, line) for a in self.allow_lm):
                self.fails.append("unexpected luamilter log line: " + line)
        if not h.maillog_barrier():
            self.fails.append("postlog(1)'s line did not reach Postfix's log within 5 s"
                              if self.mta == "postfix" else
                              "Sendmail's session processes still ran 5 s after the case")
        pf_log = h.read_from(h.MAILLOG, self.pf_off)
        if self.mta == "postfix":
            warnings = pf_clock_noise(h.lines_matching(pf_log, r"(warning|error|fatal|panic):"))
        else:
            warnings = [l for l in h.lines_matching(pf_log, SM_WARNING)
                        if not any(re.search(a, l) for a in SM_STARTUP)]
        for line in warnings:
            if not any(re.search(a, line) for a in self.allow_pf):
                self.fails.append("unexpected %s log line: %s" % (MTA_NAME[self.mta], line))
        self.diag.append(("luamilter log", lm_log))
        self.diag.append(("%s log" % MTA_NAME[self.mta], pf_log))


MTA_NAME = {"postfix": "Postfix", "sendmail": "Sendmail"}
# what the shim (spec/e2e/sendmail_shim.c) writes for a Sendmail log line
# of level warning or worse; SYSERR lines are at crit
SM_WARNING = r"^\S+ \S+\[\d+\]: (warning|err|crit|alert|emerg): "
# what every Sendmail process that starts (the daemon, a queue run) logs on
# this instance, which has no certificates and no SASL configuration
SM_STARTUP = [r"warning: STARTTLS: \w+ missing$", r"warning: error: safesasl\(.*\) failed"]


# Postfix's cleanup compares each new queue file's mtime with time(2), once
# per process until a check passes (global/mail_stream.c), and warns when
# the file is ahead.  On this kind of host (Linux with fine-grained file
# timestamps, glibc's time(2) reading the clock of the last tick) a file
# written just after a second boundary can carry the next second: the pair
# below, from a cleanup process that then resets the stamp and goes on.  It
# depends on the host's clock granularity, not on luamilter, so exactly
# that pair is dropped: "1 seconds" ahead only (a real skew is larger, or
# "behind"), and the second line only after the first from the same
# process.
PF_CLOCK_AHEAD = re.compile(r" postfix/cleanup\[(\d+)\]: warning: "
                            r"file system clock is 1 seconds ahead of local clock$")
PF_CLOCK_RESET = re.compile(r" postfix/cleanup\[(\d+)\]: warning: "
                            r"resetting file time stamps - this hurts performance$")


def pf_clock_noise(lines):
    """lines without the file-system-clock pairs of PF_CLOCK_AHEAD"""
    out, ahead = [], set()
    for line in lines:
        m = PF_CLOCK_AHEAD.search(line)
        if m:
            ahead.add(m.group(1))
            continue
        m = PF_CLOCK_RESET.search(line)
        if m and m.group(1) in ahead:
            ahead.discard(m.group(1))
            continue
        out.append(line)
    return out


def show_diag(run):
    for title, text in run.diag:
        text = text.rstrip("\n")
        if len(text) > 6000:
            text = text[:4000] + "\n... (%d chars omitted) ...\n" % (len(text) - 5500) + text[-1500:]
        print("    --- %s" % title)
        for line in text.splitlines():
            print("    | " + line)


def selected(name, only):
    """no CASE given: every case; CASE: the cases whose name starts with
    it; CASE$ (a trailing $): the case of exactly that name"""
    return not only or any(name == o[:-1] if o.endswith("$") else name.startswith(o)
                           for o in only)


def run_all(only, transports, results):
    for tp in transports:
        lm = h.daemon(tp, daemon_args())
        try:
            for name, fn, tps, mtas, known in CASES:
                if tp not in tps or h.MTA not in mtas or not selected(name, only):
                    continue
                t0 = time.monotonic()
                run = Run(name, tp, lm)
                try:
                    fn(run)
                except Abort as e:
                    run.fails.append("aborted: %s" % e)
                except Exception:
                    run.fails.append("exception in the case:\n" + traceback.format_exc())
                try:
                    run.finish()
                except Exception:
                    run.fails.append("exception after the case:\n" + traceback.format_exc())
                dt = time.monotonic() - t0
                ok = not run.fails
                status = "PASS" if ok else "FAIL"
                note = known.get(h.MTA)
                if note and not ok:
                    # the known defect showed: not counted as a failure,
                    # but printed with everything the case saw
                    status, ok = "KNOWN", True
                elif note:
                    run.fails.append("marked %r but passed: remove the marker (known=) so that "
                                     "the case checks its normal expectation" % note)
                    ok = False
                results.append((tp, name, ok, dt, status))
                print("%s %s/%s (%.1fs)%s" % (status, tp, name, dt,
                                              " " + note if status == "KNOWN" else ""),
                      flush=True)
                for f in run.fails:
                    print("    * " + f.replace("\n", "\n      "))
                if status != "PASS" or os.environ.get("E2E_VERBOSE") == "1":
                    show_diag(run)
                    sys.stdout.flush()
        finally:
            status = lm.stop()
            if lm.orphans:
                print("FAIL %s/shutdown: luamilter processes %r outlived SIGTERM" %
                      (tp, lm.orphans))
                results.append((tp, "shutdown", False, 0, "FAIL"))
            if status not in (0, None):
                print("FAIL %s/shutdown: luamilter exited with status %s after SIGTERM" %
                      (tp, status))
                results.append((tp, "shutdown", False, 0, "FAIL"))


def main():
    only = sys.argv[1:]
    transports = os.environ.get("E2E_TRANSPORTS", "unix inet").split()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.makedirs(h.WORK, exist_ok=True)
    results = []
    t_start = time.monotonic()
    try:
        run_all(only, transports, results)
    except SystemExit:
        print("e2e: interrupted")
        raise
    failed = [r for r in results if not r[2]]
    knowns = [r for r in results if r[4] == "KNOWN"]
    if h.MTA != "postfix":
        print("e2e: %s summary:" % MTA_NAME[h.MTA])
        for tp, name, _, dt, status in results:
            print("e2e:   %-5s %s/%s" % (status, tp, name))
    print("e2e: %d passed, %d failed%s, %.0fs" % (
        len(results) - len(failed) - len(knowns), len(failed),
        ", %d known" % len(knowns) if knowns else "", time.monotonic() - t_start))
    for tp, name, _, _, _ in failed:
        print("e2e: FAILED %s/%s" % (tp, name))
    if not results:
        print("e2e: no case matched")
        return 1
    return 1 if failed else 0


# ------------------------------------------------------------------ helpers

SENDER = "sender@example.test"
RCPT = "rcpt1@example.test"


def simple(run, tag, **kw):
    return mail_message(subject="e2e " + tag, msgid="%s.%s@e2e.test" % (tag, run.transport), **kw)


def by_mta(run, **expected):
    """the expected value for the MTA the suite runs on"""
    return expected[run.mta]


def addressed(run, addr, lines):
    """a MAIL or RCPT reply as the client gets it: Sendmail puts "<addr>... "
    before the text of a 450, 550 or 553 reply (sendmail/err.c, fmtmsg(),
    on the first line only), Postfix passes it as it is"""
    if run.mta != "sendmail" or lines[0][:3] not in ("450", "550", "553"):
        return lines
    first = lines[0]
    m = re.match(r"^(\d{3}[- ](?:\d\.\d{1,3}\.\d{1,3} )?)(.*)$", first)
    return [m.group(1) + "<%s>... " % addr + m.group(2)] + lines[1:]


def expect_accepted(run, tr):
    run.reply_code(tr, "MAIL", "250")
    run.reply_code(tr, ".", "250")


def expect_headers(run, msg, want):
    """msg's header list is exactly want: [(name, value)] where value is the
    text after the colon (leading space included); value None matches any
    (used for Postfix's Received:)"""
    got = [(n, None if w is None else v) for (n, v), (_, w) in zip(msg.headers, want)]
    got += msg.headers[len(want):]
    if got != want:
        show = lambda hs: "\n".join("%2d %s:%s" % (i + 1, n, "<any>" if v is None else
                                                    v.replace("\r\n", "\\r\\n"))
                                    for i, (n, v) in enumerate(hs))
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b),
                     min(len(got), len(want)))
        run.fails.append("delivered headers differ from header %d on:\n  expected:\n%s\n"
                         "  delivered:\n%s" % (first + 1, show(want), show(got)))


def received():
    return ("Received", None)


def orig_headers(msg_bytes):
    return h.split_headers(msg_bytes.split(b"\r\n\r\n", 1)[0] + b"\r\n")


# ------------------------------------------------------------------ cases

ALL_HANDLERS = r'''
for _, ev in ipairs{"connect", "helo", "abort", "close", "unknown"} do
  H[ev] = function() end
end
for _, ev in ipairs{"envfrom", "envrcpt", "data", "header", "eoh", "body"} do
  H[ev] = function(ctx) ctx.msg[ev] = true end
end
function H.eom(ctx)
  ctx:log("info", "EOM", ctx.msg.header and "headers" or "-", ctx.msg.body and "body" or "-")
  return milter.accept()
end
'''


@case("accept")
def _(run):
    """every handler continues, eom accepts: delivered byte for byte"""
    run.policy(ALL_HANDLERS)
    m = simple(run, "accept", extra=["X-Folded: first\r\n\tsecond"],
               body=b"line one\r\n.leading dot\r\n\r\ntrailing blank line follows\r\n\r\n")
    tr = run.swaks(SENDER, [RCPT, "rcpt2@example.test"], m)
    expect_accepted(run, tr)
    run.reply_code(tr, "RCPT", "250", 2)
    (d,) = run.delivered(1)
    run.eq(d.mail_addr(), "<sender@example.test>", "envelope sender")
    run.eq(sorted(d.rcpt_addrs()), ["<rcpt1@example.test>", "<rcpt2@example.test>"],
           "envelope recipients")
    run.eq(d.headers[0][0], "Received", "first delivered header")
    run.eq(d.raw[d.raw.find(b"\r\nDate:") + 2:], m, "message bytes after Received:")
    run.check(run.wait_lm_log("EOM headers body", 2), "eom did not see headers and body")


@case("accept-connect")
def _(run):
    """accept at connect: the whole session goes through unfiltered"""
    run.policy(r'''
function H.connect(ctx) return milter.accept() end
function H.eom(ctx) return milter.accept{ add_header = { {"X-Filtered", "yes"} } } end
''')
    m = simple(run, "accept-connect")
    tr = run.swaks(SENDER, [RCPT], m)
    expect_accepted(run, tr)
    (d,) = run.delivered(1)
    run.eq(d.values("X-Filtered"), [], "X-Filtered headers (eom must not run)")
    run.eq(d.body, b"Hello from the luamilter e2e suite.\r\n", "body")


ML = {"reject": ("550", "5.7.1"), "tempfail": ("451", "4.7.1")}


def ml_policy(handler, action, cond="true"):
    code, xcode = ML[action]
    return r'''
function H.%s(ctx, arg)
  if %s then
    return milter.%s{ code = %s, xcode = "%s",
      reason = { "%s by %s, line one", "100%% sure, line two" } }
  end
end
''' % (handler, cond, action, code, xcode, action, handler) + ("" if handler == "eom" else r'''
function H.eom(ctx) return milter.accept{ add_header = { {"X-Filtered", "yes"} } } end
''')


def ml_reply(handler, action):
    code, xcode = ML[action]
    return ["%s-%s %s by %s, line one" % (code, xcode, action, handler),
            "%s %s 100%% sure, line two" % (code, xcode)]


for _action in ("reject", "tempfail"):
    @case("%s-connect" % _action)
    def _(run, action=_action):
        """custom multi-line reply at connect: Postfix answers the banner
        with its own text and gives the filter's reply to MAIL"""
        run.policy(ml_policy("connect", action))
        s = run.smtp()
        s.cmd("EHLO client.e2e.test")
        s.cmd("MAIL FROM:<%s>" % SENDER)
        s.cmd("RCPT TO:<%s>" % RCPT)
        tr = run.record(s.close())
        if run.mta == "sendmail":
            # Sendmail keeps no text of a connect-stage reply: its own
            # banner, then its own reply to MAIL (and to RCPT after reject)
            if action == "reject":
                run.reply(tr, "", ["554 mta.e2e.test ESMTP not accepting messages"])
                run.reply(tr, "MAIL", ["550 5.0.0 Command rejected"])
                run.reply(tr, "RCPT", ["550 5.0.0 Command rejected"])
            else:
                banner = (tr.reply("") or [""])[0]
                run.check(banner.startswith("220 mta.e2e.test ESMTP Sendmail 8."),
                          "banner: %r" % banner)
                run.reply(tr, "MAIL", SM_TEMPFAIL)
                run.reply_code(tr, "RCPT", "503")
            run.delivered(0)
            return
        if action == "reject":
            run.reply(tr, "", ["554 mta.e2e.test ESMTP not accepting connections"])
        else:
            run.reply(tr, "", ["220 mta.e2e.test ESMTP"])
        run.reply(tr, "MAIL", ml_reply("connect", action))
        run.reply_code(tr, "RCPT", "503")
        run.delivered(0)

    @case("%s-helo" % _action)
    def _(run, action=_action):
        """custom multi-line reply at helo: EHLO gets 250, MAIL the reply"""
        run.policy(ml_policy("helo", action))
        tr = run.swaks(SENDER, [RCPT], simple(run, action + "-helo"))
        run.reply_code(tr, "EHLO", "250")
        run.reply(tr, "MAIL", ml_reply("helo", action))
        run.delivered(0)

    @case("%s-envfrom" % _action)
    def _(run, action=_action):
        """custom multi-line reply at MAIL FROM"""
        run.policy(ml_policy("envfrom", action, 'arg == "<bad@example.test>"'))
        tr = run.swaks("bad@example.test", [RCPT], simple(run, action + "-envfrom"))
        run.reply(tr, "MAIL", addressed(run, "bad@example.test", ml_reply("envfrom", action)))
        run.delivered(0)
        tr = run.swaks(SENDER, [RCPT], simple(run, action + "-envfrom-ok"))
        expect_accepted(run, tr)
        (d,) = run.delivered(1)
        run.eq(d.values("X-Filtered"), [" yes"], "X-Filtered of the next message")

    @case("%s-eom" % _action)
    def _(run, action=_action):
        """custom multi-line reply to the final dot; nothing delivered"""
        run.policy(ml_policy("eom", action))
        tr = run.swaks(SENDER, [RCPT], simple(run, action + "-eom"))
        run.reply_code(tr, "RCPT", "250")
        run.reply(tr, ".", ml_reply("eom", action))
        run.delivered(0)


@case("envrcpt-mixed")
def _(run):
    """reject and tempfail (custom multi-line) one recipient each out of
    four; the message goes to the other two only"""
    run.policy(r'''
function H.envrcpt(ctx, rcpt)
  if rcpt == "<rej@example.test>" then
    return milter.reject{ code = 550, xcode = "5.1.1",
                          reason = { "no such user here", "really none" } }
  elseif rcpt == "<tmp@example.test>" then
    return milter.tempfail{ code = 452, xcode = "4.2.2", reason = { "mailbox full", "come back later" } }
  end
end
function H.eom(ctx)
  return milter.accept{ add_header = { {"X-Rcpts", table.concat(ctx.rcpts, ",")} } }
end
''')
    tr = run.swaks(SENDER, ["ok1@example.test", "rej@example.test", "tmp@example.test",
                            "ok2@example.test"], simple(run, "envrcpt-mixed"))
    run.reply_code(tr, "RCPT TO:<ok1", "250")
    run.reply(tr, "RCPT TO:<rej", addressed(run, "rej@example.test",
                                            ["550-5.1.1 no such user here", "550 5.1.1 really none"]))
    run.reply(tr, "RCPT TO:<tmp", ["452-4.2.2 mailbox full", "452 4.2.2 come back later"])
    run.reply_code(tr, "RCPT TO:<ok2", "250")
    run.reply_code(tr, ".", "250")
    (d,) = run.delivered(1)
    run.eq(sorted(d.rcpt_addrs()), ["<ok1@example.test>", "<ok2@example.test>"],
           "envelope recipients")
    run.eq(d.values("X-Rcpts"), [" <ok1@example.test>,<ok2@example.test>"], "ctx.rcpts at eom")


@case("reject-data-header-body")
def _(run):
    """reject at DATA, at a header and tempfail at a body chunk"""
    run.policy(r'''
function H.data(ctx)
  if ctx.sender == "<data@example.test>" then
    return milter.reject{ code = 554, xcode = "5.7.1", reason = "no DATA for you" }
  end
end
function H.header(ctx, name, value)
  if name == "X-Bad" then return milter.reject{ reason = "bad header " .. value } end
end
function H.body(ctx, chunk)
  if chunk:find("TEMPFAIL-ME", 1, true) then
    return milter.tempfail{ code = 451, xcode = "4.7.0", reason = "body says later" }
  end
end
''')
    tr = run.swaks("data@example.test", [RCPT], simple(run, "data"))
    run.reply(tr, "DATA", ["554 5.7.1 no DATA for you"])
    tr = run.swaks(SENDER, [RCPT], simple(run, "header", extra=["X-Bad: evil"]))
    run.reply(tr, ".", ["550 5.7.1 bad header evil"])
    tr = run.swaks(SENDER, [RCPT], simple(run, "body", body=b"x\r\nTEMPFAIL-ME\r\n"))
    run.reply(tr, ".", ["451 4.7.0 body says later"])
    run.delivered(0)


# Held verdicts: behind Postfix (NR_HDR, NR_EOH, NR_BODY offered) header,
# eoh and body run reply-free and their verdict is given at the final dot.
# The client's replies and the delivered bytes must be what a reply per
# event gives: Postfix acts on a content-phase verdict only after the dot.
HELD_VERDICT = {
    "reject": 'milter.reject{ code = 554, xcode = "5.7.1", '
              'reason = { "rejected at " .. st .. ", line one", "100% sure, line two" } }',
    "tempfail": 'milter.tempfail{ code = 451, xcode = "4.7.1", '
                'reason = { "tempfail at " .. st .. ", line one", "100% sure, line two" } }',
    "discard": "milter.discard()",
    "accept": "milter.accept()",
}
HELD_CODES = {"reject": ("554", "5.7.1", "rejected"), "tempfail": ("451", "4.7.1", "tempfail")}


def held_policy(action):
    return r'''
local function verdict(st) return VERDICT end
local function ran(ctx, ev, what)
  ctx:log("info", "RAN", ev, ctx:header("Subject") or "-", what or "-")
end
function H.header(ctx, name, value)
  ran(ctx, "header", name)
  if name == "X-Decide" and value == "header" then return verdict("header") end
end
function H.eoh(ctx)
  ran(ctx, "eoh")
  if ctx:header("X-Decide") == "eoh" then return verdict("eoh") end
end
function H.body(ctx, chunk)
  ran(ctx, "body")
  if ctx:header("X-Decide") == "body" and chunk:find("DECIDE", 1, true) then
    return verdict("body")
  end
end
function H.eom(ctx)
  ran(ctx, "eom")
  return milter.accept{ add_header = { {"X-Filtered", "yes"} } }
end
'''.replace("VERDICT", HELD_VERDICT[action])


for _action in ("reject", "tempfail", "discard", "accept"):
    @case("held-%s" % _action)
    def _(run, action=_action):
        """a verdict decided at a header, at eoh and at a body chunk: the
        client sees it at the final dot as before, the delivered bytes are
        those of a message filtered no further, no later handler runs, and
        the next message is filtered in full"""
        run.policy(held_policy(action))
        msgs = {}
        for st in ("header", "eoh", "body"):
            m = simple(run, "held-%s-%s" % (action, st),
                       extra=["X-Decide: " + st, "X-After: later"],
                       body=b"line one\r\nDECIDE\r\nline three\r\n")
            msgs[st] = m
            tr = run.swaks(SENDER, [RCPT], m)
            run.reply_code(tr, "MAIL", "250")
            run.reply_code(tr, "RCPT", "250")
            run.reply_code(tr, "DATA", "354")
            if action in HELD_CODES:
                code, xcode, word = HELD_CODES[action]
                run.reply(tr, ".", ["%s-%s %s at %s, line one" % (code, xcode, word, st),
                                    "%s %s 100%% sure, line two" % (code, xcode)])
            else:
                run.reply_code(tr, ".", "250")
        if action == "accept":
            for d in run.delivered(3):
                subj = (d.values("Subject") or [""])[0].strip()
                st = subj.rsplit("-", 1)[-1]
                if run.check(st in msgs, "unexpected delivery %r" % subj):
                    run.eq(d.raw[d.raw.find(b"\r\nDate:") + 2:], msgs[st],
                           "%s: message bytes after Received:" % subj)
                    run.eq(d.values("X-Filtered"), [], "%s: X-Filtered (eom must not run)" % subj)
        else:
            run.delivered(0)
        log = run.lm.log_since(run.lm_off)
        for st, later in (("header", ["header %s X-After", "eoh %s", "body %s", "eom %s"]),
                          ("eoh", ["body %s", "eom %s"]), ("body", ["eom %s"])):
            subj = "e2e held-%s-%s" % (action, st)
            run.check("RAN %s %s" % (st, subj) in log, "%s did not run for %s" % (st, subj))
            for ev in later:
                run.check("RAN " + ev % subj not in log,
                          "%r ran after the %s verdict" % (ev % subj, st))
            # logged where it was decided
            run.eq(len(re.findall(r"\] %s verdict %s kept" % (st, action), log)), 1,
                   "log lines of the %s verdict kept at %s" % (action, st))
        tr = run.swaks(SENDER, [RCPT], simple(run, "held-%s-next" % action,
                                              extra=["X-Decide: none"]))
        expect_accepted(run, tr)
        (d,) = run.delivered(1)
        run.eq(d.values("X-Filtered"), [" yes"], "X-Filtered of the next message")


@case("discard")
def _(run):
    """discard at eom, at envrcpt (drops the whole message) and at envfrom:
    the client gets 250, nothing is delivered"""
    run.policy(r'''
function H.envfrom(ctx, s) if s == "<d-from@example.test>" then return milter.discard() end end
function H.envrcpt(ctx, r) if r == "<d-rcpt@example.test>" then return milter.discard() end end
function H.eom(ctx)
  if ctx.sender == "<d-eom@example.test>" then return milter.discard() end
end
''')
    for sender, rcpts in (("d-eom@example.test", [RCPT]),
                          (SENDER, [RCPT, "d-rcpt@example.test", "rcpt3@example.test"]),
                          ("d-from@example.test", [RCPT])):
        tr = run.swaks(sender, rcpts, simple(run, "discard"))
        run.reply_code(tr, "MAIL", "250")
        for i in range(len(rcpts)):
            run.reply_code(tr, "RCPT", "250", i + 1)
        run.reply_code(tr, ".", "250")
    run.delivered(0)


# Headers of the header-modification cases, as the script sees them
# (ctx.headers): 1 Date, 2 From, 3 To, 4 Subject, 5 Message-ID, 6 X-Dup,
# 7 X-Dup, 8 X-Anchor, 9 X-Dup, 10 X-Folded, 11 X-Tail.
HDR_EXTRA = ["X-Dup: one", "X-Dup: two", "X-Anchor: anchor", "X-Dup: three",
             "X-Folded: first line\r\n\tsecond line", "X-Tail: tail"]


def header_case(run, tag, mods):
    run.policy(r'''
function H.eom(ctx)
  local mods = %s
  return milter.accept(mods)
end
''' % mods)
    m = simple(run, tag, extra=HDR_EXTRA)
    tr = run.swaks(SENDER, [RCPT], m)
    expect_accepted(run, tr)
    (d,) = run.delivered(1)
    run.eq(d.body, b"Hello from the luamilter e2e suite.\r\n", "body")
    return d, orig_headers(m)


@case("add-header")
def _(run):
    """appended after the last header; a value folded with LF or with CRLF
    arrives folded with CRLF (no stray CR)"""
    d, orig = header_case(run, "add-header", r'''{ add_header = {
    {"X-Added", "added value"}, {"X-Added-2", "folded\n\tcontinued"},
    {"X-Added-3", "folded\r\n\twith CRLF"} } }''')
    expect_headers(run, d, [received()] + orig +
                   [("X-Added", " added value"), ("X-Added-2", " folded\r\n\tcontinued"),
                    ("X-Added-3", " folded\r\n\twith CRLF")])


@case("add-header-existing")
def _(run):
    """add_header of names the message already has is appended after the
    last header too, and a change_header in the same verdict still means
    the header the script saw"""
    d, orig = header_case(run, "add-header-existing", r'''{
    add_header = { {"X-Dup", "four"}, {"Subject", "second subject"} },
    change_header = { {"X-Dup", 3, "THREE"} } }''')
    want = [received()] + list(orig) + [("X-Dup", " four"), ("Subject", " second subject")]
    want[9] = ("X-Dup", " THREE")
    expect_headers(run, d, want)


@case("insert-header")
def _(run):
    """index 0 lands above Postfix's Received:, index n right after the
    n-th header the script saw (found by scanning ctx.headers), an index
    beyond the end appends"""
    d, orig = header_case(run, "insert-header", r'''{ insert_header = {} }
  local anchor
  for i, hd in ipairs(ctx.headers) do if hd[1] == "X-Anchor" then anchor = i end end
  mods.insert_header = {
    {0, "X-Top", "top"},
    {2, "X-After-From", "after from"},
    {anchor, "X-After-Anchor", "after anchor"},
    {#ctx.headers, "X-After-Last", "after last"},
    {99, "X-Beyond", "beyond"},
  }''')
    o = list(orig)
    want = ([("X-Top", " top"), received()] + o[:2] + [("X-After-From", " after from")] +
            o[2:8] + [("X-After-Anchor", " after anchor")] + o[8:] +
            [("X-After-Last", " after last"), ("X-Beyond", " beyond")])
    expect_headers(run, d, want)


@case("change-header")
def _(run):
    """change the 2nd X-Dup, the Subject, a folded header; a missing
    header is added"""
    d, orig = header_case(run, "change-header", r'''{ change_header = {
    {"X-Dup", 2, "TWO"}, {"Subject", 1, "changed subject"},
    {"X-Folded", 1, "now one line"}, {"X-Missing", 1, "created"} } }''')
    want = [received()] + [(n, v) for n, v in orig]
    want[4] = ("Subject", " changed subject")
    want[7] = ("X-Dup", " TWO")
    want[10] = ("X-Folded", " now one line")
    want.append(("X-Missing", " created"))
    expect_headers(run, d, want)


@case("delete-header")
def _(run):
    """delete the 1st and 3rd X-Dup and the folded header; deleting a
    header that does not exist does nothing"""
    d, orig = header_case(run, "delete-header", r'''{ delete_header = {
    {"X-Dup", 1}, {"X-Dup", 3}, {"X-Folded"}, {"X-Nope", 1} } }''')
    want = [received()] + [hd for i, hd in enumerate(orig) if i not in (5, 8, 9)]
    expect_headers(run, d, want)


@case("header-mods-combined")
def _(run):
    """every header modification in one verdict, each index meaning what the
    script saw: deleting X-Dup 1 and 2 deletes both originals, change of
    X-Dup 3 and inserts after deleted/changed headers land right"""
    d, orig = header_case(run, "header-mods-combined", r'''{
    add_header = { {"X-Added", "a"} },
    insert_header = { {0, "X-Top", "t"}, {6, "X-After-Dup1", "i6"}, {9, "X-After-Dup3", "i9"} },
    change_header = { {"X-Dup", 3, "THREE"}, {"Subject", 1, "S"} },
    delete_header = { {"X-Dup", 1}, {"X-Dup", 2}, {"Message-ID", 1} } }''')
    o = list(orig)
    want = ([("X-Top", " t"), received(), o[0], o[1], o[2], ("Subject", " S"),
             ("X-After-Dup1", " i6"), o[7], ("X-Dup", " THREE"), ("X-After-Dup3", " i9"),
             o[9], o[10], ("X-Added", " a")])
    expect_headers(run, d, want)


def header_list_case(run, tag, edit):
    """eom returns headers = a copy of ctx.headers after the Lua in edit"""
    return header_case(run, tag, r'''{}
  local h = {}
  for i, x in ipairs(ctx.headers) do h[i] = { x[1], x[2] } end
  %s
  mods.headers = h''' % edit)


@case("header-list-reorder")
def _(run):
    """headers = {...}: From and To swapped, X-Tail moved to the top: the
    block arrives in that order, under Postfix's Received:"""
    d, orig = header_list_case(run, "header-list-reorder", r'''h[2], h[3] = h[3], h[2]
  table.insert(h, 1, table.remove(h, #h))''')
    o = list(orig)
    expect_headers(run, d, [received(), o[10], o[0], o[2], o[1]] + o[3:10])


@case("header-list-delete-first")
def _(run):
    """headers = {...} without the first header"""
    d, orig = header_list_case(run, "header-list-delete-first", "table.remove(h, 1)")
    expect_headers(run, d, [received()] + list(orig)[1:])


@case("header-list-insert")
def _(run):
    """headers = {...} with a header on top (under Received:) and one in
    the middle, after X-Anchor"""
    d, orig = header_list_case(run, "header-list-insert", r'''table.insert(h, 9, { "X-Mid", "middle" })
  table.insert(h, 1, { "X-Top", "top" })''')
    o = list(orig)
    expect_headers(run, d, [received(), ("X-Top", " top")] + o[:8] +
                   [("X-Mid", " middle")] + o[8:])


@case("header-list-duplicates")
def _(run):
    """headers = {...} editing duplicates: the 2nd X-Dup removed, the 3rd
    changed, a new X-Dup after X-Anchor, X-Folded refolded"""
    d, orig = header_list_case(run, "header-list-duplicates", r'''h[9][2] = "THREE"
  h[10][2] = "re\n\tfolded"
  table.insert(h, 9, { "X-Dup", "new" })
  table.remove(h, 7)''')
    o = list(orig)
    expect_headers(run, d, [received()] + o[:6] + [o[7], ("X-Dup", " new"), ("X-Dup", " THREE"),
                                                   ("X-Folded", " re\r\n\tfolded"), o[10]])


@case("header-list-case")
def _(run):
    """headers = {...} changing only the case of names: delivered with the
    new spelling, in place"""
    d, orig = header_list_case(run, "header-list-case", r'''h[4][1] = "SUBJECT"
  h[8][1] = "x-anchor"''')
    o = list(orig)
    o[3] = ("SUBJECT", o[3][1])
    o[7] = ("x-anchor", o[7][1])
    expect_headers(run, d, [received()] + o)


@case("header-list-equal")
def _(run):
    """headers = ctx.headers copied unchanged: the message arrives as sent"""
    d, orig = header_list_case(run, "header-list-equal", "")
    expect_headers(run, d, [received()] + list(orig))


@case("add-rcpt")
def _(run):
    """add recipients, two of them with ESMTP arguments"""
    run.policy(r'''
function H.eom(ctx)
  return milter.accept{ add_rcpt = { "<added1@example.test>",
    {"<added2@example.test>", "NOTIFY=NEVER"},
    {"<added3@example.test>", "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;orig3@example.test"} } }
end
''')
    tr = run.swaks(SENDER, [RCPT], simple(run, "add-rcpt"))
    expect_accepted(run, tr)
    (d,) = run.delivered(1)
    run.eq(sorted(d.rcpt_addrs()), ["<added1@example.test>", "<added2@example.test>",
                                    "<added3@example.test>", "<rcpt1@example.test>"],
           "envelope recipients")
    args = {r.split(" ")[0]: r.split(" ")[1:] for r in d.rcpt}
    run.check("NOTIFY=NEVER" in args.get("<added2@example.test>", []),
              "added2 lacks NOTIFY=NEVER: %r" % d.rcpt)
    a3 = args.get("<added3@example.test>", [])
    run.check("NOTIFY=SUCCESS,FAILURE" in a3 and "ORCPT=rfc822;orig3@example.test" in a3,
              "added3 lacks NOTIFY/ORCPT: %r" % d.rcpt)


@case("del-rcpt")
def _(run):
    run.policy(r'''
function H.eom(ctx) return milter.accept{ del_rcpt = { "<rcpt2@example.test>" } } end
''')
    tr = run.swaks(SENDER, [RCPT, "rcpt2@example.test", "rcpt3@example.test"],
                   simple(run, "del-rcpt"))
    expect_accepted(run, tr)
    (d,) = run.delivered(1)
    run.eq(sorted(d.rcpt_addrs()), ["<rcpt1@example.test>", "<rcpt3@example.test>"],
           "envelope recipients")


@case("change-from")
def _(run):
    """new envelope sender, with ESMTP arguments and without; From: stays"""
    run.policy(r'''
function H.eom(ctx)
  if ctx.sender == "<plain@example.test>" then
    return milter.accept{ change_from = "<>" }
  end
  return milter.accept{ change_from = {"<bounce@example.test>", "RET=HDRS ENVID=e2e-envid"} }
end
''')
    tr = run.swaks(SENDER, [RCPT], simple(run, "change-from"))
    expect_accepted(run, tr)
    (d,) = run.delivered(1)
    run.eq(d.mail_addr(), "<bounce@example.test>", "envelope sender")
    run.check("RET=HDRS" in d.mail.split() and "ENVID=e2e-envid" in d.mail.split(),
              "MAIL FROM lacks RET/ENVID: %r" % d.mail)
    run.eq(d.values("From"), [" Sender <sender@example.test>"], "From: header")
    tr = run.swaks("plain@example.test", [RCPT], simple(run, "change-from-plain"))
    expect_accepted(run, tr)
    (d,) = run.delivered(1)
    run.eq(d.mail_addr(), "<>", "envelope sender")


def replacement_body():
    return b"".join(b"replacement line %06d %s\r\n" % (i, b"x" * 60) for i in range(1, 3001)) + \
        b"8-bit tail: gr\xc3\xbc\xc3\x9fe\r\n"


@case("replace-body")
def _(run):
    """replace the body with ~258 KB (several REPLBODY packets), together
    with a header change"""
    run.policy(r'''
function H.eom(ctx)
  local t = {}
  for i = 1, 3000 do t[i] = string.format("replacement line %06d %s\r\n", i, string.rep("x", 60)) end
  t[#t + 1] = "8-bit tail: gr\195\188\195\159e\r\n"
  return milter.accept{ add_header = { {"X-Replaced", "yes"} }, replace_body = table.concat(t) }
end
''')
    m = simple(run, "replace-body", body=b"original body\r\n")
    tr = run.swaks(SENDER, [RCPT], m)
    expect_accepted(run, tr)
    (d,) = run.delivered(1)
    want = replacement_body()
    run.check(len(want) > 3 * 65535, "replacement body is not large enough")
    run.eq(len(d.body), len(want), "delivered body length")
    run.check(d.body == want, "delivered body differs from the replacement")
    run.eq(d.values("X-Replaced"), [" yes"], "X-Replaced header")


@case("quarantine")
def _(run):
    """quarantine: 250 to the client, the message waits in the hold queue
    with its other modifications; released, it is delivered"""
    run.policy(r'''
function H.eom(ctx)
  return milter.accept{ add_header = { {"X-Quarantined", "yes"} }, quarantine = "held by e2e" }
end
''')
    tr = run.swaks(SENDER, [RCPT], simple(run, "quarantine"))
    expect_accepted(run, tr)
    run.delivered(0)
    held = run.held()
    run.eq(len(held), 1, "messages in the hold queue")
    if len(held) != 1:
        return
    qid = held[0]["queue_id"]
    if run.mta == "sendmail":
        # Sendmail: an hf file in the queue directory, the reason in its
        # q line; `sendmail -qQ -qIQID -Q` releases it, -qIQID delivers it
        qf = h.sm_qf(qid)
        run.check("X-Quarantined: yes" in qf, "quarantined message lacks X-Quarantined")
        run.check("\nqheld by e2e\n" in qf, "quarantine reason not in the hf file")
        p = h.sendmail_cmd("-qQ", "-qI" + qid, "-Q")
        run.eq(p.returncode, 0, "sendmail -qQ -qI%s -Q status (%r)" % (qid, p.stdout + p.stderr))
        p = h.sendmail_cmd("-qI" + qid, timeout=30)
        run.eq(p.returncode, 0, "sendmail -qI%s status (%r)" % (qid, p.stdout + p.stderr))
        (d,) = run.delivered(1)
        run.eq(d.values("X-Quarantined"), [" yes"], "X-Quarantined after release")
        return
    run.check("X-Quarantined: yes" in h.postcat(qid), "held message lacks X-Quarantined")
    h.postsuper("-H", qid)
    run.held0.add(qid)
    # released mail goes to the deferred queue: deliver it now
    subprocess.run(["postqueue", "-c", h.CONF, "-i", qid], capture_output=True, timeout=15)
    (d,) = run.delivered(1)
    run.eq(d.values("X-Quarantined"), [" yes"], "X-Quarantined after release")


SESSION_POLICY = r'''
function H.connect(ctx) ctx.conn.msgs, ctx.conn.aborts = 0, 0 end
function H.envfrom(ctx, sender)
  if ctx.msg.tag then ctx:log("warn", "ctx.msg not fresh") end
  ctx.conn.msgs = ctx.conn.msgs + 1
  ctx.msg.tag = sender
end
function H.abort(ctx) ctx.conn.aborts = ctx.conn.aborts + 1 end
function H.close(ctx) ctx:log("info", "CLOSE msgs=" .. ctx.conn.msgs .. " aborts=" .. ctx.conn.aborts) end
function H.eom(ctx)
  return milter.accept{ add_header = {
    {"X-Conn", ctx.id}, {"X-Msg-Number", tostring(ctx.conn.msgs)},
    {"X-Aborts", tostring(ctx.conn.aborts)}, {"X-Tag", ctx.msg.tag},
    {"X-Sender", ctx.sender}, {"X-Rcpts", table.concat(ctx.rcpts, ",")},
    {"X-Header-Count", tostring(#ctx.headers)} } }
end
'''


def values1(d, name):
    v = d.values(name)
    return v[0].strip() if len(v) == 1 else v


@case("two-messages")
def _(run):
    """two messages on one SMTP connection: one milter connection, fresh
    ctx.msg, envelope and headers for each, no abort between them"""
    run.policy(SESSION_POLICY)
    s = run.smtp()
    s.cmd("EHLO client.e2e.test")
    for i, extra in ((1, []), (2, ["X-One: 1", "X-Two: 2"])):
        s.cmd("MAIL FROM:<s%d@example.test>" % i)
        s.cmd("RCPT TO:<r%d@example.test>" % i)
        s.data(simple(run, "two-messages-%d" % i, extra=extra))
    tr = run.record(s.close())
    run.reply_code(tr, ".", "250", 1)
    run.reply_code(tr, ".", "250", 2)
    msgs = run.delivered(2)
    by = {values1(d, "X-Msg-Number"): d for d in msgs}
    run.eq(sorted(by), ["1", "2"], "X-Msg-Number values")
    if sorted(by) != ["1", "2"]:
        return
    for n, hc in (("1", "5"), ("2", "7")):
        d = by[n]
        run.eq(d.rcpt_addrs(), ["<r%s@example.test>" % n], "recipients of message " + n)
        run.eq(values1(d, "X-Tag"), "<s%s@example.test>" % n, "ctx.msg.tag of message " + n)
        run.eq(values1(d, "X-Sender"), "<s%s@example.test>" % n, "ctx.sender of message " + n)
        run.eq(values1(d, "X-Rcpts"), "<r%s@example.test>" % n, "ctx.rcpts of message " + n)
        run.eq(values1(d, "X-Header-Count"), hc, "#ctx.headers of message " + n)
        run.eq(values1(d, "X-Aborts"), "0", "aborts before message " + n)
    run.eq(values1(by["1"], "X-Conn"), values1(by["2"], "X-Conn"), "ctx.id of both messages")
    run.check(run.wait_lm_log("CLOSE msgs=2 aborts=0", 5),
              "close handler did not log 'CLOSE msgs=2 aborts=0'")


@case("rset")
def _(run):
    """RSET after MAIL and RCPT: abort runs once, the next transaction has
    its own sender and recipients only"""
    run.policy(SESSION_POLICY)
    s = run.smtp()
    s.cmd("EHLO client.e2e.test")
    s.cmd("MAIL FROM:<first@example.test>")
    s.cmd("RCPT TO:<gone@example.test>")
    s.cmd("RSET")
    s.cmd("MAIL FROM:<second@example.test>")
    s.cmd("RCPT TO:<kept@example.test>")
    s.data(simple(run, "rset"))
    tr = run.record(s.close())
    run.reply_code(tr, "RSET", "250")
    run.reply_code(tr, ".", "250")
    (d,) = run.delivered(1)
    run.eq(d.rcpt_addrs(), ["<kept@example.test>"], "envelope recipients")
    run.eq(d.mail_addr(), "<second@example.test>", "envelope sender")
    run.eq(values1(d, "X-Aborts"), "1", "aborts before the message")
    run.eq(values1(d, "X-Tag"), "<second@example.test>", "ctx.msg.tag")
    run.eq(values1(d, "X-Rcpts"), "<kept@example.test>", "ctx.rcpts")
    run.eq(values1(d, "X-Msg-Number"), "2", "envfrom count")
    run.check(run.wait_lm_log("CLOSE msgs=2 aborts=1", 5),
              "close handler did not log 'CLOSE msgs=2 aborts=1'")


def big_body(size):
    line = b"%07d " + b"abcdefghijklmnopqrstuvwxyz0123456789" * 2 + b"\r\n"
    n = size // (len(line % 0)) + 1
    return b"".join(line % i for i in range(n))


@case("big-5mb")
def _(run):
    """a 5 MB message: every body byte reaches the body handler in chunks of
    at most 64 KiB, and the delivered body is unchanged"""
    run.policy(r'''
function H.body(ctx, chunk)
  ctx.msg.bytes = (ctx.msg.bytes or 0) + #chunk
  ctx.msg.chunks = (ctx.msg.chunks or 0) + 1
  ctx.msg.max = math.max(ctx.msg.max or 0, #chunk)
end
function H.eom(ctx)
  return milter.accept{ add_header = {
    {"X-Body-Bytes", tostring(ctx.msg.bytes)}, {"X-Max-Chunk", tostring(ctx.msg.max)},
    {"X-Truncated", tostring(ctx.truncated)} } }
end
''')
    body = big_body(5 * 1024 * 1024)
    m = simple(run, "big-5mb", body=body)
    tr = run.swaks(SENDER, [RCPT], m)
    expect_accepted(run, tr)
    (d,) = run.delivered(1, timeout=60)
    run.eq(values1(d, "X-Body-Bytes"), str(len(body)), "bytes seen by the body handler")
    mx = values1(d, "X-Max-Chunk")
    run.check(isinstance(mx, str) and mx.isdigit() and 0 < int(mx) <= 65535,
              "largest body chunk %r" % mx)
    run.eq(values1(d, "X-Truncated"), "false", "ctx.truncated")
    run.eq(len(d.body), len(body), "delivered body length")
    run.check(d.body == body, "delivered body differs from the sent body")


@case("eightbit-headers")
def _(run):
    """8-bit header values reach the script byte for byte and come back
    unchanged in added and changed headers"""
    run.policy(r'''
function H.eom(ctx)
  return milter.accept{
    add_header = { {"X-Echo-Utf8", ctx:header("X-Utf8")}, {"X-Echo-Latin1", ctx:header("x-latin1")},
                   {"X-Latin1-Len", tostring(#ctx:header("X-Latin1"))},
                   {"X-New", "na\195\175ve caf\195\169"} },
    change_header = { {"Subject", 1, "\195\156ber: " .. ctx:header("Subject")} } }
end
''')
    utf8 = "Grüße aus Köln – ☃".encode("utf-8")
    m = simple(run, "eightbit", extra=[b"X-Utf8: " + utf8, b"X-Latin1: caf\xe9 cr\xe8me"],
               body=b"body with 8-bit bytes: \xe9\xe8\xff\r\n")
    tr = run.swaks(SENDER, [RCPT], m)
    expect_accepted(run, tr)
    (d,) = run.delivered(1)
    lat = " " + b"caf\xe9 cr\xe8me".decode("latin-1")
    run.eq(d.values("X-Echo-Utf8"), [" " + utf8.decode("latin-1")], "X-Echo-Utf8")
    run.eq(d.values("X-Echo-Latin1"), [lat], "X-Echo-Latin1")
    run.eq(d.values("X-Latin1-Len"), [" 10"], "length of the Latin-1 value in Lua")
    run.eq(d.values("X-New"), [" " + "naïve café".encode().decode("latin-1")], "X-New")
    run.eq(d.values("Subject"), [" " + ("Über: e2e eightbit").encode().decode("latin-1")],
           "changed Subject")
    run.eq(d.body, b"body with 8-bit bytes: \xe9\xe8\xff\r\n", "body")


@case("example-lua")
def _(run):
    """the shipped example.lua: blocked sender, external sender (Subject
    tag + X-Policy), audited domain (added recipient)"""
    with open(os.path.join(h.ROOT, "example.lua")) as f:
        run.policy(f.read(), raw=True)
    tr = run.swaks("spammer@example.net", [RCPT], simple(run, "example-blocked"))
    run.reply(tr, "MAIL", addressed(run, "spammer@example.net", [
        "550-5.7.1 Sender <spammer@example.net> is blocked by local policy.",
        "550 5.7.1 Contact postmaster@example.org if this is a mistake."]))
    run.delivered(0)
    tr = run.swaks("someone@elsewhere.test", [RCPT],
                   mail_message(subject="hello", msgid="example-ext@e2e.test"))
    expect_accepted(run, tr)
    (d,) = run.delivered(1)
    run.eq(d.values("Subject"), [" [EXTERNAL] hello"], "Subject of external mail")
    run.eq(d.headers[-1], ("X-Policy", " luamilter example; client=127.0.0.1"), "last header")
    tr = run.swaks("boss@example.org", ["cfo@finance.example.org"],
                   mail_message(subject="numbers", msgid="example-int@e2e.test"))
    expect_accepted(run, tr)
    (d,) = run.delivered(1)
    run.eq(sorted(d.rcpt_addrs()), ["<audit@example.org>", "<cfo@finance.example.org>"],
           "recipients of audited mail")
    run.eq(d.values("Subject"), [" numbers"], "Subject of internal mail")


@case("handler-error")
def _(run):
    """a handler that raises: that recipient gets luamilter's generic 451,
    the others are unaffected; the error is logged with file:line"""
    run.policy(r'''
function H.envrcpt(ctx, rcpt)
  if rcpt == "<boom@example.test>" then error("boom for " .. rcpt) end
end
''')
    run.allow_lm.append(r"ERROR .*boom for <boom@example.test>")
    run.allow_lm.append(r"ERROR .*(traceback|policy-\w+\.lua:\d+)")
    tr = run.swaks(SENDER, [RCPT, "boom@example.test"], simple(run, "handler-error"))
    run.reply(tr, "RCPT TO:<boom", LM_ONERROR)
    run.reply_code(tr, ".", "250")
    (d,) = run.delivered(1)
    run.eq(d.rcpt_addrs(), ["<rcpt1@example.test>"], "envelope recipients")
    log = run.lm.log_since(run.lm_off)
    run.check(re.search(r"ERROR .*policy-\w+\.lua:5:.*boom for", log),
              "no ERROR line with file:line for the failing handler")


@case("default-replies")
def _(run):
    """reject{}/tempfail{} without text give Postfix's default replies; code
    and xcode alone get the generic text; a reason alone gets 550 5.7.1
    (451 4.7.1: luamilter always sends an enhanced status code)"""
    run.policy(r'''
local V = {
  ["<r-plain@example.test>"] = milter.reject{},
  ["<t-plain@example.test>"] = milter.tempfail{},
  ["<r-code@example.test>"] = milter.reject{ code = 554, xcode = "5.7.0" },
  ["<t-code@example.test>"] = milter.tempfail{ code = 450, xcode = "4.2.0" },
  ["<r-reason@example.test>"] = milter.reject{ reason = "just a reason" },
  ["<t-reason@example.test>"] = milter.tempfail{ reason = "later, please" },
}
function H.envrcpt(ctx, rcpt) return V[rcpt] end
''')
    rc = ["r-plain", "t-plain", "r-code", "t-code", "r-reason", "t-reason"]
    tr = run.swaks(SENDER, [r + "@example.test" for r in rc] + [RCPT], simple(run, "defaults"))
    want = {"r-plain": ["550 5.7.1 Command rejected"],
            "t-plain": by_mta(run, postfix=PF_TEMPFAIL, sendmail=SM_TEMPFAIL),
            "r-code": ["554 5.7.0 Command rejected"],
            "t-code": ["450 4.2.0 Service unavailable - try again later"],
            "r-reason": ["550 5.7.1 just a reason"],
            "t-reason": ["451 4.7.1 later, please"]}
    for r in rc:
        run.reply(tr, "RCPT TO:<%s@" % r, addressed(run, r + "@example.test", want[r]))
    run.reply_code(tr, ".", "250")
    (d,) = run.delivered(1)
    run.eq(d.rcpt_addrs(), ["<rcpt1@example.test>"], "envelope recipients")


RCPTS_AT_EOM = r'''
function H.eom(ctx)
  return milter.accept{ add_header = { {"X-Rcpts", table.concat(ctx.rcpts, ",")} } }
end
'''


class Dnsmasq:
    """Debian's dnsmasq on a free loopback UDP port, serving a DNSBL zone
    in which 127.0.0.1 (the e2e client) is listed; stopped by pid"""

    def __init__(self):
        import socket
        self.dir = os.path.join(h.WORK, "dnsmasq")
        os.makedirs(self.dir, exist_ok=True)
        for _ in range(5):  # another process may take the port found free
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u.bind(("127.0.0.1", 0))
            self.port = u.getsockname()[1]
            u.close()
            conf = os.path.join(self.dir, "conf")
            with open(conf, "w") as f:
                f.write("\n".join([
                    "port=%d" % self.port, "listen-address=127.0.0.1", "bind-interfaces",
                    "no-resolv", "no-hosts", "no-poll", "local=/zen.e2e.test/",
                    "host-record=1.0.0.127.zen.e2e.test,127.0.0.2", ""]))
            self.proc = subprocess.Popen(["dnsmasq", "-C", conf, "--keep-in-foreground"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if h.poll(lambda: self.proc.poll() is not None or self._answers(), 5) and \
                    self.proc.poll() is None:
                return
            self.stop()
        raise Abort("dnsmasq did not start")

    def _answers(self):
        import socket
        q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + \
            b"\x01\x31\x01\x30\x01\x30\x03\x31\x32\x37\x03zen\x03e2e\x04test\x00\x00\x01\x00\x01"
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        c.settimeout(0.1)
        try:
            c.sendto(q, ("127.0.0.1", self.port))
            return bool(c.recv(512))
        except OSError:
            return False
        finally:
            c.close()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@case("dnsbl-connect")
def _(run):
    """a DNSBL policy with a real, non-blocking lookup (dnsmasq): the
    listed client (127.0.0.1) is refused at connect; an unlisted zone lets
    it through, filtered"""
    dns = Dnsmasq()
    try:
        run.policy(r'''
function H.connect(ctx, host, addr)
  local hit, err = milter.dns.rbl(addr.address, ctx.conn.zone or "zen.e2e.test", 2)
  if hit then
    return milter.reject{ code = 554, xcode = "5.7.1", reason = "listed at zen: " .. hit[1] }
  end
end
function H.helo(ctx) end
function H.eom(ctx)
  local clean = milter.dns.rbl(ctx.client.address, "clean.zen.e2e.test", 2)
  return milter.accept{ add_header = { {"X-DNSBL", tostring(clean)} } }
end
''', args={"--dns": "127.0.0.1:%d" % dns.port})
        s = run.smtp()
        s.cmd("EHLO client.e2e.test")
        s.cmd("MAIL FROM:<%s>" % SENDER)
        tr = run.record(s.close())
        if run.mta == "sendmail":   # its own texts after a connect-stage reply
            run.reply(tr, "", ["554 mta.e2e.test ESMTP not accepting messages"])
            run.reply(tr, "MAIL", ["550 5.0.0 Command rejected"])
        else:
            run.reply(tr, "", ["554 mta.e2e.test ESMTP not accepting connections"])
            run.reply(tr, "MAIL", ["554 5.7.1 listed at zen: 127.0.0.2"])
        run.delivered(0)
        run.policy(r'''
function H.connect(ctx, host, addr)
  local hit = milter.dns.rbl(addr.address, "other.e2e.test", 2)
  if hit then return milter.reject{} end
end
function H.eom(ctx)
  local hit = milter.dns.rbl(ctx.client.address, "zen.e2e.test", 2)
  return milter.accept{ add_header = { {"X-DNSBL", hit and hit[1] or "clean"} } }
end
''', args={"--dns": "127.0.0.1:%d" % dns.port})
        tr = run.swaks(SENDER, [RCPT], simple(run, "dnsbl-eom"))
        expect_accepted(run, tr)
        (d,) = run.delivered(1)
        run.eq(d.values("X-DNSBL"), [" 127.0.0.2"], "the eom lookup's answer")
    finally:
        dns.stop()


@case("eom-waits-past-content-timeout", mtas=PF_ONLY)
def _(run):
    """an eom handler that waits (milter.sleep) longer than Postfix's
    milter_content_timeout (10 s here): luamilter's progress packets keep
    Postfix waiting, and the message is delivered with the handler's
    header"""
    run.policy(r'''
function H.eom(ctx)
  milter.sleep(12)
  return milter.accept{ add_header = { {"X-Waited", "12s"} } }
end
''', args={"--script-timeout": "20"})
    tr = run.swaks(SENDER, [RCPT], simple(run, "eom-progress"), timeout=60)
    expect_accepted(run, tr)
    (d,) = run.delivered(1)
    run.eq(d.values("X-Waited"), [" 12s"], "the waiting handler's header")


@case("held-waits-past-content-timeout")
def _(run):
    """header handlers that wait (milter.sleep) 6 s each, 12 s in all, past
    Postfix's milter_content_timeout (10 s here) while Postfix, having sent
    the rest reply-free, waits for the final reply: progress packets keep
    it waiting, and the kept reject answers the dot"""
    run.policy(r'''
function H.header(ctx, name, value)
  if name:sub(1, 7) == "X-Wait-" then milter.sleep(6) end
  if name == "X-Wait-2" then return milter.reject{ code = 554, reason = "waited" } end
end
function H.eom(ctx) return milter.accept{ add_header = { {"X-Filtered", "yes"} } } end
''', args={"--script-timeout": "8"})
    tr = run.swaks(SENDER, [RCPT], simple(run, "held-progress",
                                          extra=["X-Wait-1: a", "X-Wait-2: b"]), timeout=60)
    run.reply(tr, ".", ["554 5.7.1 waited"])
    run.delivered(0)


@case("reply-digit-text")
def _(run):
    """reply texts that begin with a digit, without xcode: Postfix reads a
    digit in a reply's fifth byte as an enhanced status code and refuses
    the reply when its class differs from the code's (malformed reply:
    451 4.3.5 to that command and the rest of the session).  luamilter
    adds the default enhanced code to every line, so the client gets the
    text, and a recipient after the rejected one is taken, with the
    milter still filtering (it sees that recipient, eom adds a header)"""
    run.policy(r'''
function H.envrcpt(ctx, rcpt)
  if rcpt == "<twofa@example.test>" then
    return milter.reject{ reason = "2FA required" }
  elseif rcpt == "<twoline@example.test>" then
    return milter.tempfail{ reason = { "first", "2nd line" } }
  end
end
''' + RCPTS_AT_EOM)
    tr = run.swaks(SENDER, ["twoline@example.test", RCPT], simple(run, "reply-digit-ml"))
    run.reply(tr, "RCPT TO:<twoline", ["451-4.7.1 first", "451 4.7.1 2nd line"])
    run.reply_code(tr, "RCPT TO:<rcpt1", "250")
    run.reply_code(tr, ".", "250")
    (d,) = run.delivered(1)
    run.eq(d.rcpt_addrs(), ["<rcpt1@example.test>"], "envelope recipients")
    run.eq(d.values("X-Rcpts"), [" <rcpt1@example.test>"], "ctx.rcpts at eom")
    tr = run.swaks(SENDER, [RCPT, "twofa@example.test", "rcpt2@example.test"],
                   simple(run, "reply-digit"))
    run.reply_code(tr, "RCPT TO:<rcpt1", "250")
    run.reply(tr, "RCPT TO:<twofa", addressed(run, "twofa@example.test", ["550 5.7.1 2FA required"]))
    run.reply_code(tr, "RCPT TO:<rcpt2", "250")
    run.reply_code(tr, ".", "250")
    (d,) = run.delivered(1)
    run.eq(sorted(d.rcpt_addrs()), ["<rcpt1@example.test>", "<rcpt2@example.test>"],
           "envelope recipients")
    run.eq(d.values("X-Rcpts"), [" <rcpt1@example.test>,<rcpt2@example.test>"],
           "ctx.rcpts at eom (the milter saw the recipient after the reject)")


@case("on-error-accept-envrcpt")
def _(run):
    """--on-error accept and a handler that raises at RCPT: that recipient
    is let through (continue), the message is not accepted unfiltered: a
    later recipient's reject still applies and eom still runs"""
    run.policy(r'''
function H.envrcpt(ctx, rcpt)
  if rcpt == "<boom@example.test>" then error("boom for " .. rcpt) end
  if rcpt == "<rej@example.test>" then
    return milter.reject{ code = 550, xcode = "5.1.1", reason = "no such user here" }
  end
end
''' + RCPTS_AT_EOM, args={"--on-error": "accept"})
    run.allow_lm.append(r"ERROR .*boom for <boom@example.test>")
    run.allow_lm.append(r"ERROR .*(traceback|policy-\w+\.lua:\d+)")
    tr = run.swaks(SENDER, [RCPT, "boom@example.test", "rej@example.test", "rcpt2@example.test"],
                   simple(run, "on-error-accept"))
    run.reply_code(tr, "RCPT TO:<rcpt1", "250")
    run.reply_code(tr, "RCPT TO:<boom", "250")
    run.reply(tr, "RCPT TO:<rej", addressed(run, "rej@example.test", ["550 5.1.1 no such user here"]))
    run.reply_code(tr, "RCPT TO:<rcpt2", "250")
    run.reply_code(tr, ".", "250")
    (d,) = run.delivered(1)
    run.eq(sorted(d.rcpt_addrs()), ["<boom@example.test>", "<rcpt1@example.test>",
                                    "<rcpt2@example.test>"], "envelope recipients")
    run.eq(d.values("X-Rcpts"),
           [" <rcpt1@example.test>,<boom@example.test>,<rcpt2@example.test>"],
           "ctx.rcpts at eom (eom ran, with every recipient Postfix took)")
    run.check(re.search(r"ERROR .*boom for <boom@example.test>", run.lm.log_since(run.lm_off)),
              "the handler's error was not logged")


@case("tempfail-421")
def _(run):
    """a 421 reply at envrcpt: the client gets the text, then Postfix
    closes the session; nothing is delivered"""
    run.policy(r'''
function H.envrcpt(ctx, rcpt)
  if rcpt == "<bye@example.test>" then
    return milter.tempfail{ code = 421, xcode = "4.7.0", reason = "closing now" }
  end
end
''')
    s = run.smtp()
    s.cmd("EHLO client.e2e.test")
    s.cmd("MAIL FROM:<%s>" % SENDER)
    s.cmd("RCPT TO:<%s>" % RCPT)
    s.cmd("RCPT TO:<bye@example.test>")
    s.cmd("DATA")
    closed = s.closed
    tr = run.record(s.close())
    run.reply(tr, "RCPT TO:<bye", ["421 4.7.0 closing now"])
    run.check(closed, "Postfix did not close the session after 421")
    run.delivered(0)


@case("body-skip")
def _(run):
    """skip from the first body chunk: no more chunks, eom still runs, the
    body is delivered unchanged"""
    run.policy(r'''
function H.body(ctx, chunk)
  ctx.msg.n = (ctx.msg.n or 0) + 1
  ctx.msg.bytes = #chunk
  return milter.skip()
end
function H.eom(ctx)
  return milter.accept{ add_header = { {"X-Chunks", tostring(ctx.msg.n)},
                                       {"X-Bytes", tostring(ctx.msg.bytes)} } }
end
''')
    body = big_body(300 * 1024)
    tr = run.swaks(SENDER, [RCPT], simple(run, "body-skip", body=body))
    expect_accepted(run, tr)
    (d,) = run.delivered(1)
    run.eq(values1(d, "X-Chunks"), "1", "body calls")
    run.eq(values1(d, "X-Bytes"), "65535", "bytes of the one chunk")
    run.check(d.body == body, "delivered body differs from the sent body")


@case("unknown-command")
def _(run):
    """the unknown handler's reply replaces the MTA's 500; mail still flows
    on the same connection.  Postfix passes the verb only, Sendmail the
    whole command line"""
    run.policy(r'''
function H.unknown(ctx, cmd)
  return milter.reject{ code = 502, xcode = "5.5.1", reason = "no " .. cmd .. " here" }
end
function H.eom(ctx) return milter.accept{ add_header = { {"X-Filtered", "yes"} } } end
''')
    s = run.smtp()
    s.cmd("EHLO client.e2e.test")
    s.cmd("XFOO bar baz")
    s.cmd("MAIL FROM:<%s>" % SENDER)
    s.cmd("RCPT TO:<%s>" % RCPT)
    s.data(simple(run, "unknown"))
    tr = run.record(s.close())
    run.reply(tr, "XFOO", by_mta(run, postfix=["502 5.5.1 no XFOO here"],
                                 sendmail=["502 5.5.1 no XFOO bar baz here"]))
    run.reply_code(tr, ".", "250")
    (d,) = run.delivered(1)
    run.eq(d.values("X-Filtered"), [" yes"], "X-Filtered")


@case("macros-ctx")
def _(run):
    """ctx.client, ctx.helo and macros as Postfix really sends them; the
    queue id macro matches the id Postfix gave the client"""
    run.policy(r'''
function H.eom(ctx)
  local c = ctx.client
  return milter.accept{ add_header = {
    {"X-Qid", ctx:macro("i") or "nil"}, {"X-J", ctx:macro("j") or "nil"},
    {"X-Daemon", ctx:macro("{daemon_name}") or "nil"}, {"X-V", ctx:macro("v") or "nil"},
    {"X-Mail-Addr", ctx:macro("mail_addr") or "nil"},
    {"X-Client", string.format("%s|%s|%s|%s", c.host, c.family, c.address, tostring(c.port))},
    {"X-Helo", ctx.helo or "nil"}, {"X-Id-Type", type(ctx.id)} } }
end
''')
    tr = run.swaks(SENDER, [RCPT], simple(run, "macros"))
    expect_accepted(run, tr)
    (d,) = run.delivered(1)
    final = (tr.reply(".") or [""])[-1]
    # "250 2.0.0 Ok: queued as QID"; "250 2.0.0 QID Message accepted for delivery"
    qid = by_mta(run, postfix=final.rsplit(" ", 1)[-1], sendmail=(final.split(" ") + ["", ""])[2])
    run.eq(values1(d, "X-Qid"), qid, "macro i (queue id)")
    run.eq(values1(d, "X-J"), "mta.e2e.test", "macro j")
    # Sendmail's {daemon_name} is the daemon's Name= (DAEMON_OPTIONS), and
    # its default Milter.macros.connect has no v
    run.eq(values1(d, "X-Daemon"), by_mta(run, postfix="mta.e2e.test",
                                          sendmail="MTA-" + run.transport),
           "macro {daemon_name}")
    if run.mta == "sendmail":
        # not in Sendmail's default macro lists: luamilter asks for it at
        # DATA (SETSYMLIST) to tell the MTA's header rules apart
        run.check(str(values1(d, "X-V")).startswith("8."), "macro v: %r" % d.values("X-V"))
    else:
        run.check(str(values1(d, "X-V")).startswith("Postfix 3."), "macro v: %r" % d.values("X-V"))
    run.eq(values1(d, "X-Mail-Addr"), "sender@example.test", "macro {mail_addr}")
    run.check(re.match(r"^localhost\|inet\|127\.0\.0\.1\|\d+$", str(values1(d, "X-Client"))),
              "ctx.client: %r" % d.values("X-Client"))
    run.eq(values1(d, "X-Helo"), "client.e2e.test", "ctx.helo")
    run.eq(values1(d, "X-Id-Type"), "string", "type of ctx.id")


@case("accept-envfrom")
def _(run):
    """accept at envfrom ends filtering of that message only: its eom does
    not run, the next message on the connection is filtered again"""
    run.policy(r'''
function H.envfrom(ctx, s) if s == "<acc@example.test>" then return milter.accept() end end
function H.eom(ctx) return milter.accept{ add_header = { {"X-Filtered", ctx.sender} } } end
''')
    s = run.smtp()
    s.cmd("EHLO client.e2e.test")
    for sender in ("acc@example.test", SENDER):
        s.cmd("MAIL FROM:<%s>" % sender)
        s.cmd("RCPT TO:<%s>" % RCPT)
        s.data(simple(run, "accept-envfrom-" + sender.split("@")[0]))
    tr = run.record(s.close())
    run.reply_code(tr, ".", "250", 1)
    run.reply_code(tr, ".", "250", 2)
    msgs = run.delivered(2)
    by = {d.mail_addr(): d for d in msgs}
    run.eq(sorted(by), ["<acc@example.test>", "<sender@example.test>"], "senders")
    if len(by) == 2:
        run.eq(by["<acc@example.test>"].values("X-Filtered"), [], "X-Filtered of the accepted message")
        run.eq(by["<sender@example.test>"].values("X-Filtered"), [" <sender@example.test>"],
               "X-Filtered of the next message")


@case("parallel")
def _(run):
    """eight concurrent SMTP sessions: each message gets the headers of its
    own connection and message state"""
    run.policy(r'''
function H.envfrom(ctx, s) ctx.msg.tag = s end
function H.header(ctx, name, value) if name == "Subject" then ctx.msg.subject = value end end
function H.eom(ctx)
  return milter.accept{ add_header = { {"X-Tag", ctx.msg.tag}, {"X-Subj", ctx.msg.subject},
                                       {"X-Conn", ctx.id} } }
end
''')
    procs = []
    for i in range(8):
        path = os.path.join(h.WORK, "parallel-%d.eml" % i)
        h.write_file(path, simple(run, "parallel-%d" % i, body=big_body(20000 * (i + 1)))[:-2])
        procs.append(subprocess.Popen(
            ["swaks", "--server", "127.0.0.1", "--port", str(run.port), "--helo", "client.e2e.test",
             "--from", "p%d@example.test" % i, "--to", RCPT, "--timeout", "60",
             "--suppress-data", "--data", "@" + path],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for i, p in enumerate(procs):
        try:
            out, _ = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        tr = h.parse_swaks(out.decode("latin-1"))
        run.reply_code(tr, ".", "250")
    msgs = run.delivered(8)
    conns = set()
    for d in msgs:
        sender = d.mail_addr()
        i = sender[2:3]
        run.eq(values1(d, "X-Tag"), sender, "X-Tag of " + sender)
        run.eq(values1(d, "X-Subj"), "e2e parallel-" + i, "X-Subj of " + sender)
        conns.add(values1(d, "X-Conn"))
    run.eq(len(conns), 8, "distinct ctx.id values")


@case("reload-midsession", mtas=PF_ONLY)
def _(run):
    """SIGHUP while an SMTP session is open: that session finishes on the
    old script, the next one uses the new script"""
    run.policy(r'''
function H.eom(ctx) return milter.accept{ add_header = { {"X-Policy-Version", "A"} } } end
''')
    s = run.smtp()
    s.cmd("EHLO client.e2e.test")
    s.cmd("MAIL FROM:<old@example.test>")
    s.cmd("RCPT TO:<%s>" % RCPT)
    run.reload(r'''
function H.eom(ctx) return milter.accept{ add_header = { {"X-Policy-Version", "B"} } } end
''')
    s.data(simple(run, "reload-old"))
    tr = run.record(s.close())
    run.reply_code(tr, ".", "250")
    (d,) = run.delivered(1)
    run.eq(d.values("X-Policy-Version"), [" A"], "policy of the session open across the reload")
    tr = run.swaks(SENDER, [RCPT], simple(run, "reload-new"))
    (d,) = run.delivered(1)
    run.eq(d.values("X-Policy-Version"), [" B"], "policy of a new session")



@case("reload-visible", mtas=PF_ONLY)
def _(run):
    """after SIGHUP, once the log says 'reloaded ...: generation N', every
    new connection uses the new script (the new script takes 0.3 s to load,
    as one that reads a data file at startup would)"""
    run.policy(r'''
function H.eom(ctx) return milter.accept{ add_header = { {"X-Policy-Version", "A"} } } end
''')
    run.reload(r'''
local t0 = os.clock()
while os.clock() - t0 < 0.3 do end
function H.eom(ctx) return milter.accept{ add_header = { {"X-Policy-Version", "B"} } } end
''')
    for i in range(4):
        # the first session connects at once, the others a little later
        s = run.smtp()
        s.cmd("EHLO client.e2e.test")
        s.cmd("MAIL FROM:<%s>" % SENDER)
        s.cmd("RCPT TO:<%s>" % RCPT)
        s.data(simple(run, "reload-visible-%d" % i))
        tr = run.record(s.close())
        run.reply_code(tr, ".", "250")
        (d,) = run.delivered(1)
        run.eq(d.values("X-Policy-Version"), [" B"],
               "policy of session %d after the reload" % (i + 1))


@case("reload-busy-worker", mtas=PF_ONLY)
def _(run):
    """SIGHUP while the only worker is busy in a handler: a connection that
    arrives after 'reloaded ...: generation 2' was logged must use the new
    script, the busy session finishes on the old one"""
    run.policy(r'''
function H.eom(ctx)
  if ctx.sender == "<slow@example.test>" then
    ctx:log("info", "IN-SLOW")
    local t0 = os.clock()
    while os.clock() - t0 < 1.5 do end
  end
  return milter.accept{ add_header = { {"X-Policy-Version", "A"} } }
end
''', args={"--workers": "1"})
    path = os.path.join(h.WORK, "slow.eml")
    h.write_file(path, simple(run, "reload-busy-slow")[:-2])
    p = subprocess.Popen(["swaks", "--server", "127.0.0.1", "--port", str(run.port),
                          "--helo", "client.e2e.test", "--from", "slow@example.test",
                          "--to", RCPT, "--timeout", "60", "--suppress-data",
                          "--data", "@" + path],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    run.check(h.poll(lambda: "IN-SLOW" in run.lm.log_since(run.lm_off), 10),
              "the slow handler never started")
    run.reload(r'''
function H.eom(ctx) return milter.accept{ add_header = { {"X-Policy-Version", "B"} } } end
''')
    s = run.smtp()
    s.cmd("EHLO client.e2e.test")
    s.cmd("MAIL FROM:<%s>" % SENDER)
    s.cmd("RCPT TO:<%s>" % RCPT)
    s.data(simple(run, "reload-busy-new"))
    tr = run.record(s.close())
    run.reply_code(tr, ".", "250")
    try:
        out, _ = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
    run.diag.append(("SMTP transcript (slow session)", out.decode("latin-1")))
    msgs = run.delivered(2)
    by = {d.mail_addr(): d for d in msgs}
    run.eq(sorted(by), ["<sender@example.test>", "<slow@example.test>"], "senders")
    if len(by) == 2:
        run.eq(by["<slow@example.test>"].values("X-Policy-Version"), [" A"],
               "policy of the session open across the reload")
        run.eq(by["<sender@example.test>"].values("X-Policy-Version"), [" B"],
               "policy of the session opened after 'reloaded' was logged")

@case("sendmail-submission", transports=("unix",), mtas=PF_ONLY)
def _(run):
    """mail submitted with sendmail(1) goes through non_smtpd_milters:
    Postfix emulates connect (localhost, port 0) and helo, and sends the
    envelope addresses as given, without angle brackets"""
    run.policy(r'''
function H.eom(ctx)
  local c = ctx.client
  return milter.accept{ add_header = {
    {"X-Client", string.format("%s|%s|%s", c.host, c.address, tostring(c.port))},
    {"X-Helo", tostring(ctx.helo)}, {"X-Sender", ctx.sender},
    {"X-Rcpts", table.concat(ctx.rcpts, ",")} } }
end
''')
    msg = simple(run, "sendmail").replace(b"\r\n", b"\n")
    p = subprocess.run(["sendmail", "-C", h.CONF, "-f", "sm@example.test", "-i", "--", RCPT],
                       input=msg, capture_output=True, timeout=20)
    run.eq(p.returncode, 0, "sendmail exit status")
    (d,) = run.delivered(1)
    run.eq(values1(d, "X-Client"), "localhost|127.0.0.1|0", "ctx.client")
    run.eq(values1(d, "X-Helo"), "localhost", "ctx.helo")
    run.eq(values1(d, "X-Sender"), "sm@example.test", "ctx.sender")
    run.eq(values1(d, "X-Rcpts"), "rcpt1@example.test", "ctx.rcpts")

FILTERED = r'''
function H.eom(ctx) return milter.accept{ add_header = { {"X-Filtered", ctx.client.address} } } end
'''


def resend_filtered(run, tag):
    """after a failure, mail is filtered again"""
    tr = run.swaks(SENDER, [RCPT], simple(run, tag))
    expect_accepted(run, tr)
    (d,) = run.delivered(1)
    run.eq(d.values("X-Filtered"), [" 127.0.0.1"], "X-Filtered after the milter is back")


@case("milter-stopped")
def _(run):
    """luamilter stopped: Postfix tempfails the session (mail delayed, not
    accepted unfiltered); submitted mail waits in the queue and is filtered
    once luamilter is back"""
    run.policy(FILTERED)
    run.allow_pf.append(by_mta(run, postfix=PF_MILTER_DOWN, sendmail=SM_MILTER_DOWN))
    st = run.lm.stop()
    run.eq(st, 0, "luamilter exit status after SIGTERM")
    if run.transport == "unix":
        run.check(not os.path.exists(h.LISTEN["unix"][5:]), "unix socket left behind")
    tr = run.swaks(SENDER, [RCPT], simple(run, "stopped"))
    run.reply(tr, "MAIL", by_mta(run, postfix=PF_TEMPFAIL, sendmail=SM_TEMPFAIL))
    run.check(tr.reply(".") is None, "the message was sent although MAIL failed")
    run.delivered(0)
    if run.mta == "sendmail":
        run.lm.start(lua(FILTERED))
        resend_filtered(run, "stopped-after")
        return
    if run.transport == "unix":
        # sendmail(1) goes through non_smtpd_milters (the unix socket)
        msg = simple(run, "stopped-sendmail").replace(b"\r\n", b"\n")
        p = subprocess.run(["sendmail", "-C", h.CONF, "-f", SENDER, "-i", "--", RCPT],
                           input=msg, capture_output=True, timeout=20)
        run.eq(p.returncode, 0, "sendmail exit status")
        # pickup hands it to cleanup, cleanup cannot reach the milter: the
        # file must stay queued
        queued = h.poll(lambda: h.read_from(h.MAILLOG, run.pf_off).count(
            "connect to Milter service") >= 2, 10)
        run.check(queued, "cleanup never tried the milter for the sendmail(1) message")
        time.sleep(1)
        q = h.postqueue() or []
        run.eq(len(q), 1, "messages queued while luamilter is down: %r" % q)
        run.eq(len(h.sink_files() - run.sink0), 0, "messages delivered while luamilter is down")
        run.allow_pf.append(r"warning: .*(milter|Milter)")
    run.lm.start(lua(FILTERED))
    if run.transport == "unix":
        subprocess.run(["postkick", "-c", h.CONF, "public", "pickup", "W"],
                       capture_output=True, timeout=10)
        (d,) = run.delivered(1, timeout=30)
        run.eq(d.values("X-Filtered"), [" 127.0.0.1"], "X-Filtered of the delayed message")
        run.eq(d.values("Subject"), [" e2e stopped-sendmail"], "Subject of the delayed message")
    resend_filtered(run, "stopped-after")


HANG = r"""
local ffi = require "ffi"
ffi.cdef "int getpid(void);"
function H.envrcpt(ctx, rcpt)
  if rcpt == "<hang-rcpt@example.test>" then
    ctx:log("info", "IN-RCPT pid=" .. ffi.C.getpid())
    while true do end
  end
end
function H.eom(ctx)
  if ctx.sender == "<hang-eom@example.test>" then
    ctx:log("info", "IN-EOM pid=" .. ffi.C.getpid())
    while true do end
  end
  return milter.accept{ add_header = { {"X-Filtered", ctx.client.address} } }
end
"""
PF_LOST_MILTER = r"warning: milter .*: can't read SMFIC_(BODYEOB|RCPT) reply packet header"


def hang_and_kill(run, sender, rcpt, mark, kill):
    """starts a swaks session that makes a handler loop, waits until the
    handler runs, calls kill(pid of the worker running it), and returns the
    transcript"""
    data = simple(run, "crash-" + mark)
    path = os.path.join(h.WORK, "message.eml")
    h.write_file(path, data[:-2])
    p = subprocess.Popen(["swaks", "--server", "127.0.0.1", "--port", str(run.port),
                          "--helo", "client.e2e.test", "--from", sender, "--to", rcpt,
                          "--timeout", "60", "--suppress-data", "--data", "@" + path],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    pat = re.compile(mark + r" pid=(\d+)")
    m = h.poll(lambda: pat.search(run.lm.log_since(run.lm_off)), 15)
    run.check(m, "luamilter never reached " + mark)
    if m:
        kill(int(m.group(1)))
    try:
        out, _ = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
    tr = h.parse_swaks(out.decode("latin-1"))
    run.diag.append(("SMTP transcript (%s)" % mark, tr.text))
    return tr


@case("worker-crash", mtas=PF_ONLY)
def _(run):
    """the worker running a handler is killed (SIGKILL) at eom, then at
    RCPT: Postfix tempfails, nothing is delivered, the supervisor starts a
    new worker and mail is filtered again without any restart"""
    run.policy(HANG)
    run.allow_pf.append(PF_LOST_MILTER)
    run.allow_lm.append(r"ERROR worker \d+ was killed by signal 9")
    for sender, rcpt, mark, cmd in (("hang-eom@example.test", RCPT, "IN-EOM", "."),
                                    (SENDER, "hang-rcpt@example.test", "IN-RCPT", "RCPT")):
        off = run.lm.log_size()
        tr = hang_and_kill(run, sender, rcpt, mark, lambda pid: os.kill(pid, signal.SIGKILL))
        run.reply(tr, cmd, PF_TEMPFAIL)
        run.delivered(0)
        run.check(run.lm.alive(), "the supervisor died with its worker")
        run.check(h.poll(lambda: "starting a new worker" in run.lm.log_since(off), 5),
                  "no new worker was started")
    resend_filtered(run, "worker-crash-after")


@case("daemon-crash", mtas=PF_ONLY)
def _(run):
    """the whole daemon (supervisor and workers) killed with SIGKILL while a
    session waits at RCPT: Postfix tempfails, nothing is delivered; a
    restarted luamilter (stale unix socket file left behind) serves again"""
    run.policy(HANG)
    run.allow_pf.append(PF_LOST_MILTER)
    run.allow_pf.append(PF_MILTER_DOWN)

    def kill_all(_pid):
        run.lm.signal_all(signal.SIGKILL)
        run.lm.wait(5)
    tr = hang_and_kill(run, SENDER, "hang-rcpt@example.test", "IN-RCPT", kill_all)
    run.reply(tr, "RCPT", PF_TEMPFAIL)
    run.check(h.poll(lambda: not run.lm.leftovers(), 5), "processes survived SIGKILL")
    tr = run.swaks(SENDER, [RCPT], simple(run, "daemon-down"))
    run.reply(tr, "MAIL", PF_TEMPFAIL)
    run.delivered(0)
    run.lm.start(lua(FILTERED))
    resend_filtered(run, "daemon-crash-after")


@case("supervisor-crash", mtas=PF_ONLY)
def _(run):
    """only the supervisor is killed (SIGKILL): its workers must not live
    on unsupervised (they keep the listening socket, so a restarted
    luamilter cannot bind); meanwhile mail is filtered or tempfailed, never
    passed unfiltered; a restarted luamilter serves"""
    run.policy(FILTERED)
    run.allow_pf.append(PF_MILTER_DOWN)
    run.allow_lm.append(r"ERROR worker \d+: the supervisor is gone")
    run.check(run.lm.workers(), "no worker processes found")
    run.lm.signal(signal.SIGKILL)
    run.lm.wait(5)
    tr = run.swaks(SENDER, [RCPT], simple(run, "supervisor-killed"))
    if tr.reply("MAIL") == PF_TEMPFAIL:
        run.delivered(0)
    else:
        (d,) = run.delivered(1)
        run.eq(d.values("X-Filtered"), [" 127.0.0.1"], "X-Filtered while the supervisor is dead")
    gone = h.poll(lambda: not run.lm.leftovers(), 10)
    run.check(gone, "workers %r still running 10 s after their supervisor was killed" %
              run.lm.leftovers())
    run.lm.kill_leftovers()
    run.lm.start(lua(FILTERED))
    resend_filtered(run, "supervisor-crash-after")


@case("runaway-handler", mtas=PF_ONLY)
def _(run):
    """handlers that never return, with --script-timeout 1: an interpreted
    loop at RCPT is stopped by the count hook (that recipient gets the
    --on-error reply, the worker keeps serving); a JIT-compiled spin at eom
    is caught by the watchdog, which answers the --on-error reply before
    the worker exits; Postfix gets both replies well within its timeouts"""
    run.policy(r'''
function H.envrcpt(ctx, rcpt)
  if rcpt == "<slow@example.test>" then
    local n = 0 -- a closure made in the loop keeps it interpreted (FNEW)
    while true do n = n + #tostring(n) + (function() return 1 end)() end
  end
end
function H.eom(ctx)
  if ctx.sender == "<spin@example.test>" then while true do end end
  return milter.accept{ add_header = { {"X-Filtered", ctx.client.address} } }
end
''', args={"--script-timeout": "1"})
    run.allow_lm.append(r"ERROR .*(longer than --script-timeout|watchdog|script-timeout)")
    run.allow_lm.append(r"ERROR worker \d+ exited with status 70")
    run.allow_pf.append(PF_LOST_MILTER)
    t0 = time.monotonic()
    tr = run.swaks(SENDER, [RCPT, "slow@example.test"], simple(run, "runaway-rcpt"))
    run.reply(tr, "RCPT TO:<slow", LM_ONERROR)
    run.reply_code(tr, ".", "250")
    (d,) = run.delivered(1)
    run.eq(d.rcpt_addrs(), ["<rcpt1@example.test>"], "envelope recipients")
    run.eq(d.values("X-Filtered"), [" 127.0.0.1"], "X-Filtered")
    tr = run.swaks("spin@example.test", [RCPT], simple(run, "runaway-eom"))
    run.reply(tr, ".", LM_ONERROR)
    run.delivered(0)
    took = time.monotonic() - t0
    run.check(took < 8, "the two runaway sessions took %.1fs" % took)
    resend_filtered(run, "runaway-after")


@case("milter-hung", mtas=PF_ONLY)
def _(run):
    """luamilter frozen (SIGSTOP to all its processes): Postfix's
    milter_command_timeout (5 s) expires and the session is tempfailed;
    after SIGCONT mail flows again"""
    run.policy(FILTERED)
    run.allow_pf.append(r"warning: milter .*: (read error in initial handshake|"
                        r"can't read SMFIC_OPTNEG reply packet header: Connection timed out)")
    run.allow_lm.append(r"WARN ")
    run.lm.signal_all(signal.SIGSTOP)
    try:
        tr = run.swaks(SENDER, [RCPT], simple(run, "hung"))
    finally:
        run.lm.signal_all(signal.SIGCONT)
    run.reply(tr, "MAIL", PF_TEMPFAIL)
    run.delivered(0)
    resend_filtered(run, "hung-after")


if __name__ == "__main__":
    sys.exit(main())
