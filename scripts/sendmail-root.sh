#!/bin/sh
# Unpacks Debian 12's Sendmail into a private tree without installing it:
#
#   scripts/sendmail-root.sh [DIR]        (default build/sendmail-root; as root)
#
# sendmail-bin conflicts with postfix, so it must never be installed on a
# machine that runs the Postfix suite.  Instead this fetches the .deb files
# of sendmail-bin, sendmail-base (helpfile), sendmail-cf (the m4 files that
# make a sendmail.cf) and the two libraries sendmail needs that Debian 12
# does not have by default (liblockfile1, libwrap0) with `apt-get download`
# from the configured Debian archive, and unpacks them with `dpkg-deb -x`.
# Nothing is run from the packages (no maintainer scripts, no alternatives,
# no service).  The other libraries sendmail links (libdb5.3, libldap,
# libsasl2, libssl3, libnsl2) are checked to be present; m4 comes from
# scripts/deps.sh.  Cached: a tree with DIR/.complete is reused as is.
#
# The unpacked binary is DIR/usr/libexec/sendmail/sendmail; run it with
# LD_LIBRARY_PATH=DIR/usr/lib/x86_64-linux-gnu (scripts/e2e-sendmail.sh does).  Its
# set-group-ID bit is cleared: a set-group-ID program ignores
# LD_LIBRARY_PATH and LD_PRELOAD, and the suite runs it as root anyway.
set -eu
cd "$(dirname "$0")/.."
DIR=${1:-build/sendmail-root}
PKGS="sendmail-bin sendmail-base sendmail-cf liblockfile1 libwrap0"
NEEDED="libdb5.3 libldap-2.5-0 libsasl2-2 libssl3 libnsl2 m4"

if [ -f "$DIR/.complete" ]; then exit 0; fi
[ "$(id -u)" -eq 0 ] || { echo "sendmail-root: needs root (apt-get download, dpkg-deb -x)" >&2; exit 1; }
for p in $NEEDED; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || {
    echo "sendmail-root: package $p is not installed (scripts/deps.sh test installs it)" >&2; exit 1; }
done
rm -rf "$DIR" "$DIR.tmp"
mkdir -p "$DIR.tmp/debs"
# apt's download sandbox user (_apt) must be able to write the directory
chmod 777 "$DIR.tmp/debs"
# shellcheck disable=SC2086  # a list of package names, split on purpose
(cd "$DIR.tmp/debs" && apt-get download -q $PKGS >/dev/null 2>"../download.log") || {
  # a stale package list (a point release replaced a version): refresh once
  apt-get update -qq || true
  # shellcheck disable=SC2086  # a list of package names, split on purpose
(cd "$DIR.tmp/debs" && apt-get download -q $PKGS >/dev/null 2>"../download.log") || {
    cat "$DIR.tmp/download.log" >&2; echo "sendmail-root: apt-get download failed" >&2; exit 1; }
}
for f in "$DIR.tmp/debs"/*.deb; do dpkg-deb -x "$f" "$DIR.tmp/root"; done
SM=$DIR.tmp/root/usr/libexec/sendmail/sendmail
[ -x "$SM" ] || { echo "sendmail-root: no sendmail binary in the packages" >&2; exit 1; }
chown root:root "$SM"
chmod 0755 "$SM"
LD_LIBRARY_PATH=$DIR.tmp/root/usr/lib/x86_64-linux-gnu ldd "$SM" >"$DIR.tmp/ldd.txt"
if grep -q "not found" "$DIR.tmp/ldd.txt"; then
  cat "$DIR.tmp/ldd.txt" >&2; echo "sendmail-root: sendmail lacks libraries" >&2; exit 1
fi
(cd "$DIR.tmp/debs" && ls -- *.deb) >"$DIR.tmp/root/.packages"
mv "$DIR.tmp/root" "$DIR"
rm -rf "$DIR.tmp"
touch "$DIR/.complete"
echo "sendmail-root: unpacked $(tr '\n' ' ' <"$DIR/.packages")into $DIR"
