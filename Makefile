# luamilter — see README.md.  `make run` serves example.lua, `make test` runs
# every test; both install missing Debian packages first (scripts/deps.sh).

CC      ?= gcc
CFLAGS  ?= -O2 -g
WARN    := -std=c11 -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes
DEFS    := -D_POSIX_C_SOURCE=200809L -D_DEFAULT_SOURCE
LUAJIT_CFLAGS := $(or $(shell pkg-config --cflags luajit 2>/dev/null),-I/usr/include/luajit-2.1)
LUAJIT_LIBS   := $(or $(shell pkg-config --libs luajit 2>/dev/null),-lluajit-5.1)
LIBS    := $(LUAJIT_LIBS) -lev -lm

B       ?= build
SRCS    := log buf wire sess mods pfsim lb lctx lverdict offline conn listen super main
CORE    := log buf wire sess mods pfsim
OBJS    := $(SRCS:%=$(B)/%.o)
BUSTED  := luajit /usr/bin/busted

.PHONY: all run test deps deps-test check-c lint spec asan clean

all: deps $(B)/luamilter

deps:
	@scripts/deps.sh build

$(B)/milter_lua.h: lua/milter.lua
	@mkdir -p $(B)
	luajit -b -t h -n milter $< $@

$(B)/%.o: src/%.c src/*.h $(B)/milter_lua.h
	@mkdir -p $(B)
	$(CC) $(WARN) $(DEFS) $(CFLAGS) $(LUAJIT_CFLAGS) -I$(B) -c $< -o $@

$(B)/luamilter: $(OBJS)
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $(OBJS) $(LIBS)

run: all
	./$(B)/luamilter example.lua

# C unit tests of the codec and the session (no loop, no VM).
$(B)/test_wire: spec/c/test_wire.c spec/c/fixture.c spec/c/*.h $(CORE:%=$(B)/%.o)
	$(CC) $(WARN) $(DEFS) $(CFLAGS) -Isrc -o $@ spec/c/test_wire.c spec/c/fixture.c $(CORE:%=$(B)/%.o)
$(B)/test_sess: spec/c/test_sess.c spec/c/fixture.c spec/c/*.h $(CORE:%=$(B)/%.o)
	$(CC) $(WARN) $(DEFS) $(CFLAGS) -Isrc -o $@ spec/c/test_sess.c spec/c/fixture.c $(CORE:%=$(B)/%.o)

$(B)/test_pfsim: spec/c/test_pfsim.c spec/c/fixture.c spec/c/*.h $(CORE:%=$(B)/%.o)
	$(CC) $(WARN) $(DEFS) $(CFLAGS) -Isrc -o $@ spec/c/test_pfsim.c spec/c/fixture.c $(CORE:%=$(B)/%.o)

check-c: $(B)/test_wire $(B)/test_sess $(B)/test_pfsim
	$(B)/test_wire ../shared/fixtures
	$(B)/test_sess ../shared/fixtures
	$(B)/test_pfsim ../shared/fixtures

lint:
	scripts/check-layers.sh
	luacheck -q lua spec example.lua

spec: $(B)/luamilter
	LUAMILTER_BIN=$(B)/luamilter $(BUSTED) spec/lua spec/daemon

deps-test:
	@scripts/deps.sh test

test: deps-test all
	$(MAKE) check-c lint spec

# Sanitizer build: the C tests and the daemon specs under ASan + UBSan.
asan: deps-test
	$(MAKE) B=build-asan CC=clang \
	  CFLAGS="-O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all" \
	  LDFLAGS="-fsanitize=address,undefined" build-asan/luamilter check-c spec

clean:
	rm -rf build build-asan
