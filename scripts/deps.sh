#!/bin/sh
# Installs the Debian 12 packages luamilter needs, only those missing.
# Usage: scripts/deps.sh [build|test|deb]   (test and deb include build;
# deb is what `make deb` needs; Postfix and swaks are installed by
# scripts/e2e-postfix.sh, which preseeds debconf; m4 makes the Sendmail
# suite's .cf, whose Sendmail is unpacked by scripts/sendmail-root.sh).
# No service is started by the install: the tests run their own servers
# (redis-server, rspamd) on free loopback ports with private configs.
set -eu
level=${1:-build}
pkgs="make gcc pkg-config libev-dev libluajit-5.1-dev luajit lua-cjson libc-ares-dev libhiredis-dev libcurl4-openssl-dev liblmdb-dev libsystemd-dev libmicrohttpd-dev"
case $level in
  deb) pkgs="$pkgs debhelper dpkg-dev lintian" ;;
  test) pkgs="$pkgs lua-busted lua-check lua-socket lua-posix clang libclang-rt-14-dev valgrind python3 dnsmasq-base redis-server openssl lmdb-utils rspamd procps systemd man-db debhelper dpkg-dev lintian m4" ;;
esac
missing=""
for p in $pkgs; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
echo "installing:$missing"
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "need root (or sudo) to install:$missing" >&2; exit 1; }
  SUDO=sudo
else
  SUDO=
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq || true
# redis-server's and rspamd's postinst start their system service through
# invoke-rc.d / deb-systemd-invoke, which ask /usr/sbin/policy-rc.d first:
# 101 is "not allowed". Ours is in place only during the install; one that
# was there before (Docker images ship one) is put back.
policy=/usr/sbin/policy-rc.d
restore_policy() {
  if [ -e $policy.luamilter-saved ]; then $SUDO mv -f $policy.luamilter-saved $policy
  else $SUDO rm -f $policy; fi
}
# (a saved one left by a run that was killed is the original: keep it)
if [ -e $policy ] && [ ! -e $policy.luamilter-saved ]; then
  $SUDO mv -f $policy $policy.luamilter-saved
fi
trap restore_policy EXIT
trap 'exit 1' INT TERM HUP
printf '#!/bin/sh\nexit 101\n' | $SUDO tee $policy >/dev/null
$SUDO chmod 755 $policy
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
case " $missing " in
  *" rspamd "*)
    # not at boot either (sysv links and, where present, systemctl); and
    # should a service have started anyway, stop it (pgrep: procps)
    $SUDO update-rc.d rspamd disable >/dev/null 2>&1 || true
    if pgrep -x rspamd >/dev/null; then
      if [ -d /run/systemd/system ]; then $SUDO systemctl stop rspamd.service || true
      else $SUDO /etc/init.d/rspamd stop >/dev/null || true; fi
      sleep 1
      if pgrep -x rspamd >/dev/null; then
        echo "a system rspamd is running after the install: $(pgrep -x rspamd | tr '\n' ' ')" >&2
        exit 1
      fi
    fi ;;
esac
