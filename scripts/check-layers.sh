#!/bin/sh
# The layering rules of STYLE.md: only the glue and the lookup engines
# include libev, only the Lua bridge and the lookups' bindings include Lua
# headers, and the codec/session stay free of both. Engine headers must
# include neither (the bindings include them). The store engine (store.c,
# LMDB) needs no loop: it includes neither. Only notify.c (sd_notify, for
# the supervisor) includes systemd's headers.
set -eu
cd "$(dirname "$0")/.."
bad=0
for f in src/*.c src/*.h; do
  case $f in
    src/conn.[ch]|src/listen.[ch]|src/super.[ch]|src/reload.[ch]|src/main.c) ;;
    src/metrics_http.[ch]) ;; # the supervisor's HTTP endpoint (glue)
    src/aio.c|src/dnsr.c|src/tcpc.c|src/rds.c|src/httpc.c) ;; # lookup engines
    *) if grep -q '#include <ev.h>' "$f"; then echo "$f includes ev.h" >&2; bad=1; fi ;;
  esac
  case $f in
    src/lb.c|src/lctx.c|src/lverdict.c|src/lwhere.c|src/lsetup.c|src/lb_int.h) ;;
    src/lwait.c|src/ldns.c|src/ltcp.c|src/lredis.c|src/lhttp.c|src/lstore.c|src/lstore_rds.c) ;; # bindings
    *) if grep -Eq '#include <(lua|lauxlib|lualib)\.h>' "$f"; then echo "$f includes Lua headers" >&2; bad=1; fi ;;
  esac
  case $f in
    src/notify.c) ;;
    *) if grep -q '#include <systemd/' "$f"; then echo "$f includes systemd headers" >&2; bad=1; fi ;;
  esac
done
exit $bad
