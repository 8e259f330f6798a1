#!/usr/bin/python3
"""Runs a systemd service's ExecStart as systemd would, where no systemd
runs (scripts/deb-install-check.sh: the installed luamilter.service).

    unit-exec.py exec UNIT      becomes the service's main process
    unit-exec.py get UNIT KEY   prints the value of [Service] KEY
    unit-exec.py dirs UNIT      prints the StateDirectory= and
                                RuntimeDirectory= paths, one a line

`exec` does what systemd does before the exec: the environment
(Environment=, then EnvironmentFile=, whose NAME=value lines override it:
no shell, `#`/`;` comments, optional quotes; plus PATH, HOME, USER,
LOGNAME, SHELL, STATE_DIRECTORY and RUNTIME_DIRECTORY), StateDirectory= and
RuntimeDirectory= made for User=/Group= with their modes (an existing
one owned by someone else given to them, contents included), LimitNOFILE=,
UMask=, the working directory /, stdin from /dev/null, then ExecStart
expanded as systemd does ($NAME as a word of its own: the value split at
whitespace; ${NAME}: the value as it is), run through setpriv as User= and
Group= (with the user's supplementary groups), NoNewPrivileges= and an
empty CapabilityBoundingSet= applied.  The process keeps this one's pid,
so the caller's $! is the service's main pid.  stdout and stderr are the
caller's (the journal under systemd).  What only systemd can do (the
namespaces, seccomp and Protect* sandboxing, sd_notify, restarts) is not
done; a [Service] key this script does not know fails it, so a unit that
grows one is looked at again.
"""
import os
import pwd
import grp
import re
import resource
import shlex
import sys

# [Service] keys: those applied here, and those that only systemd's
# supervision or sandboxing uses (not applied: see the docstring)
APPLIED = {"ExecStart", "Environment", "EnvironmentFile", "User", "Group", "UMask",
           "StateDirectory", "StateDirectoryMode", "RuntimeDirectory",
           "RuntimeDirectoryMode", "LimitNOFILE", "NoNewPrivileges",
           "CapabilityBoundingSet"}
SYSTEMD_ONLY = {"Type", "NotifyAccess", "ExecReload", "KillMode", "TimeoutStopSec",
                "Restart", "RestartSec", "ProtectSystem", "ReadWritePaths", "ProtectHome",
                "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
                "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
                "ProtectClock", "ProtectHostname", "RestrictAddressFamilies",
                "RestrictNamespaces", "RestrictRealtime", "RestrictSUIDSGID",
                "LockPersonality", "RemoveIPC", "SystemCallArchitectures",
                "SystemCallFilter", "SystemCallErrorNumber"}


def die(msg):
    sys.stderr.write("unit-exec: %s\n" % msg)
    sys.exit(1)


def service_section(path):
    """[(key, value)] of the [Service] section, in order (continuation
    lines joined, comments dropped)"""
    out, section, pending = [], None, ""
    with open(path) as f:
        for raw in f:
            line = raw.rstrip("\n")
            if pending:
                line, pending = pending + line, ""
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            s = line.strip()
            if not s or s[0] in "#;":
                continue
            if s.startswith("[") and s.endswith("]"):
                section = s[1:-1]
                continue
            if section != "Service":
                continue
            key, eq, value = s.partition("=")
            if not eq:
                die("%s: not KEY=VALUE: %r" % (path, s))
            out.append((key.strip(), value.strip()))
    return out


def last(entries, key, default=None):
    vals = [v for k, v in entries if k == key]
    return vals[-1] if vals else default


def unquote_env(value):
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        inner = value[1:-1]
        return re.sub(r"\\(.)", r"\1", inner) if value[0] == '"' else inner
    return value


def env_file(path):
    """systemd's EnvironmentFile=: NAME=value lines, no shell"""
    env, pending = {}, ""
    with open(path) as f:
        for raw in f:
            line = pending + raw.rstrip("\n")
            pending = ""
            if line.endswith("\\"):
                pending = line[:-1]
                continue
            s = line.strip()
            if not s or s[0] in "#;":
                continue
            key, eq, value = s.partition("=")
            if not eq or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key.strip()):
                die("%s: not NAME=value: %r" % (path, s))
            env[key.strip()] = unquote_env(value.strip())
    return env


def unit_env(entries):
    env = {}
    for k, v in entries:
        if k == "Environment":
            for word in shlex.split(v):
                name, eq, value = word.partition("=")
                if not eq:
                    die("Environment=: not NAME=value: %r" % word)
                env[name] = value
    for k, v in entries:
        if k == "EnvironmentFile":
            optional = v.startswith("-")
            path = v[1:] if optional else v
            if os.path.exists(path):
                env.update(env_file(path))
            elif not optional:
                die("EnvironmentFile=%s is missing" % path)
    return env


def expand(cmdline, env):
    """ExecStart= words, with systemd's $NAME and ${NAME}"""
    if cmdline[:1] in "-@:+!":
        die("ExecStart= prefixes are not supported: %r" % cmdline)
    argv = []
    for word in shlex.split(cmdline):
        m = re.match(r"^\$([A-Za-z_][A-Za-z0-9_]*)$", word)
        if m:
            argv += env.get(m.group(1), "").split()
            continue
        argv.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
                           lambda mm: env.get(mm.group(1), ""), word.replace("$$", "\0"))
                    .replace("\0", "$"))
    return argv


def check_keys(entries):
    for k, _ in entries:
        if k not in APPLIED and k not in SYSTEMD_ONLY:
            die("[Service] %s= is not known to this script: teach it (scripts/unit-exec.py)" % k)


def dirs(entries):
    """[(path, mode)] of StateDirectory= and RuntimeDirectory="""
    out = []
    for key, base in (("StateDirectory", "/var/lib"), ("RuntimeDirectory", "/run")):
        mode = int(last(entries, key + "Mode", "0755"), 8)
        for k, v in entries:
            if k == key:
                out += [(os.path.join(base, d), mode) for d in v.split()]
    return out


def chown_tree(top, uid, gid):
    """what systemd does to an existing StateDirectory= owned by someone
    else: the whole tree is given to the service's user"""
    st = os.lstat(top)
    if (st.st_uid, st.st_gid) == (uid, gid):
        return
    for d, subdirs, files in os.walk(top):
        for name in subdirs + files:
            os.lchown(os.path.join(d, name), uid, gid)
    os.lchown(top, uid, gid)


def do_exec(entries):
    check_keys(entries)
    user = last(entries, "User")
    if not user:
        die("no User=: this script runs services as their own user only")
    pw = pwd.getpwnam(user)
    group = last(entries, "Group") or grp.getgrgid(pw.pw_gid).gr_name
    gid = grp.getgrnam(group).gr_gid
    env = unit_env(entries)
    argv = expand(last(entries, "ExecStart") or die("no ExecStart="), env)
    if not argv or not os.path.isabs(argv[0]):
        die("ExecStart= must start with an absolute path: %r" % argv)
    made = dirs(entries)
    for path, mode in made:
        os.makedirs(path, exist_ok=True)
        chown_tree(path, pw.pw_uid, gid)
        os.chmod(path, mode)
    run_env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin",
               "HOME": pw.pw_dir, "USER": user, "LOGNAME": user, "SHELL": pw.pw_shell}
    for name, (path, _) in zip(("STATE_DIRECTORY", "RUNTIME_DIRECTORY"), made):
        run_env[name] = path
    run_env.update(env)
    nofile = last(entries, "LimitNOFILE")
    if nofile:
        n = int(nofile)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
        except (ValueError, OSError):
            # a container whose hard limit root may not raise: as high as
            # it goes (the daemon raises its soft limit up to the hard one)
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            sys.stderr.write("unit-exec: LimitNOFILE=%d: the hard limit here is %d, "
                             "not raised\n" % (n, hard))
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    umask = last(entries, "UMask")
    if umask:
        os.umask(int(umask, 8))
    os.chdir("/")
    fd = os.open("/dev/null", os.O_RDONLY)
    os.dup2(fd, 0)
    os.close(fd)
    priv = ["setpriv", "--reuid=%d" % pw.pw_uid, "--regid=%d" % gid, "--init-groups"]
    if last(entries, "NoNewPrivileges") == "yes":
        priv.append("--no-new-privs")
    if last(entries, "CapabilityBoundingSet", None) == "":
        priv += ["--bounding-set=-all", "--inh-caps=-all"]
    sys.stderr.write("unit-exec: %s\n" % " ".join(shlex.quote(a) for a in argv))
    sys.stderr.flush()
    os.execvpe("setpriv", priv + ["--"] + argv, run_env)


def main():
    if len(sys.argv) < 3:
        die("usage: unit-exec.py exec|get|dirs UNIT [KEY]")
    cmd, unit = sys.argv[1], sys.argv[2]
    entries = service_section(unit)
    if cmd == "exec":
        do_exec(entries)
    elif cmd == "get" and len(sys.argv) == 4:
        v = last(entries, sys.argv[3])
        if v is None:
            die("%s: no %s=" % (unit, sys.argv[3]))
        print(v)
    elif cmd == "dirs":
        for path, _ in dirs(entries):
            print(path)
    else:
        die("usage: unit-exec.py exec|get|dirs UNIT [KEY]")


if __name__ == "__main__":
    main()
