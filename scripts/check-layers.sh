#!/bin/sh
# The layering rules of STYLE.md: only the glue includes libev, only the Lua
# bridge includes Lua headers, and the codec/session stay free of both.
set -eu
cd "$(dirname "$0")/.."
bad=0
for f in src/*.c src/*.h; do
  case $f in
    src/conn.[ch]|src/listen.[ch]|src/super.[ch]|src/reload.[ch]|src/main.c) ;;
    *) if grep -q '#include <ev.h>' "$f"; then echo "$f includes ev.h" >&2; bad=1; fi ;;
  esac
  case $f in
    src/lb.c|src/lctx.c|src/lverdict.c|src/lb_int.h) ;;
    *) if grep -Eq '#include <(lua|lauxlib|lualib)\.h>' "$f"; then echo "$f includes Lua headers" >&2; bad=1; fi ;;
  esac
done
exit $bad
