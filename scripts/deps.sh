#!/bin/sh
# Installs the Debian 12 packages luamilter needs, only those missing.
# Usage: scripts/deps.sh [build|test|deb]   (test and deb include build;
# deb is what `make deb` needs; Postfix and swaks are installed by
# scripts/e2e-postfix.sh, which preseeds debconf)
set -eu
level=${1:-build}
pkgs="make gcc pkg-config libev-dev libluajit-5.1-dev luajit lua-cjson libc-ares-dev libhiredis-dev libcurl4-openssl-dev liblmdb-dev libsystemd-dev"
case $level in
  deb) pkgs="$pkgs debhelper dpkg-dev lintian" ;;
  test) pkgs="$pkgs lua-busted lua-check lua-socket lua-posix clang libclang-rt-14-dev valgrind python3 dnsmasq-base redis-server openssl lmdb-utils systemd man-db debhelper dpkg-dev lintian" ;;
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
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
