# luamilter — see README.md.  `make run` serves example.lua, `make test` runs
# every test; both install missing Debian packages first (scripts/deps.sh).

CC      ?= gcc
# -flto: the message path crosses many small files (wire, sess, conn, lb,
# buf, metrics); inlined across them it takes 6% fewer instructions.
CFLAGS  ?= -O2 -g -flto=auto
WARN    := -std=c11 -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes
DEFS    := -D_POSIX_C_SOURCE=200809L -D_DEFAULT_SOURCE
LUAJIT_CFLAGS := $(or $(shell pkg-config --cflags luajit 2>/dev/null),-I/usr/include/luajit-2.1)
LUAJIT_LIBS   := $(or $(shell pkg-config --libs luajit 2>/dev/null),-lluajit-5.1)
LIBS    := $(LUAJIT_LIBS) -lev -lcares -lhiredis -lcurl -llmdb -lsystemd -lmicrohttpd -lm

B       ?= build
SRCS    := log buf wire sess sconn sheld mods mta hmodel hplan msglog metrics pfsim lb lctx lverdict lwhere lsetup \
           lheld lwait ldns ltcp lredis lhttp lstore lstore_rds offline offline_report aio dnsr tcpc rds \
           httpc store watchdog conn listen ctl reload notify metrics_http daemon super main
CORE    := log buf wire sess sconn sheld mods mta hmodel hplan pfsim
OBJS    := $(SRCS:%=$(B)/%.o)
BUSTED  := luajit /usr/bin/busted
# what installs the packages (a spec swaps in its own to check the order)
DEPS_SH ?= scripts/deps.sh

.PHONY: all run test deps deps-test check-c lint spec asan fuzz fuzz-check e2e e2e-sendmail clean install uninstall deb deb-check

all: deps $(B)/luamilter

deps:
	@$(DEPS_SH) build

# "| deps" (order-only): under make -j on a fresh machine nothing is
# compiled before the packages it needs are in.
$(B)/milter_lua.h: lua/milter.lua scripts/bcname.lua | deps
	@mkdir -p $(B)
	luajit scripts/bcname.lua $< milter $(B)/milter.raw
	luajit -b -g -t h -n milter $(B)/milter.raw $@

$(B)/%.o: src/%.c src/*.h $(B)/milter_lua.h | deps
	@mkdir -p $(B)
	$(CC) $(WARN) $(DEFS) $(CFLAGS) $(LUAJIT_CFLAGS) -I$(B) -c $< -o $@

# $(WARN) here too: with -flto the compiler's later passes, and their
# warnings, run at this step.
$(B)/luamilter: $(OBJS)
	$(CC) $(WARN) $(CFLAGS) $(LDFLAGS) -o $@ $(OBJS) $(LIBS)

run: all
	./$(B)/luamilter example.lua

# make install [PREFIX=/usr/local] [DESTDIR=staging]: the binary, the
# milter.test module where LuaJIT's busted finds it, the man page, the
# systemd unit (its ExecStart names the installed binary), and the unit's
# example options and policy under share/luamilter.
PREFIX  ?= /usr/local
SBINDIR ?= $(PREFIX)/sbin
LUADIR  ?= $(PREFIX)/share/lua/5.1
MANDIR  ?= $(PREFIX)/share/man
UNITDIR ?= $(PREFIX)/lib/systemd/system
DATADIR ?= $(PREFIX)/share/luamilter

install: $(B)/luamilter
	install -d $(DESTDIR)$(SBINDIR) $(DESTDIR)$(LUADIR)/milter $(DESTDIR)$(MANDIR)/man8 \
	  $(DESTDIR)$(UNITDIR) $(DESTDIR)$(DATADIR)
	install -m 0755 $(B)/luamilter $(DESTDIR)$(SBINDIR)/luamilter
	sed 's|return "luamilter"$$|return "$(SBINDIR)/luamilter"|' lua/milter/test.lua \
	  >$(DESTDIR)$(LUADIR)/milter/test.lua
	chmod 0644 $(DESTDIR)$(LUADIR)/milter/test.lua
	install -m 0644 scripts/luamilter.8 $(DESTDIR)$(MANDIR)/man8/luamilter.8
	sed 's|/usr/local/sbin/luamilter|$(SBINDIR)/luamilter|' scripts/luamilter.service \
	  >$(DESTDIR)$(UNITDIR)/luamilter.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/luamilter.service
	install -m 0644 scripts/luamilter.default $(DESTDIR)$(DATADIR)/luamilter.default
	install -m 0644 example.lua $(DESTDIR)$(DATADIR)/example.lua

# make deb: a Debian package (scripts/debian/) built by dpkg-buildpackage
# from a copy of the source staged under $(B)/deb, checked by lintian;
# luamilter_VERSION_ARCH.deb lands in $(B)/deb. The sub-make must not
# inherit this one's variables (B, DESTDIR...).
VERSION  = $(shell sed -n 's/^\#define VERSION "\(.*\)"/\1/p' src/main.c)
DEB_DIR  = $(B)/deb
DEB_SRC  = $(DEB_DIR)/luamilter-$(VERSION)
deb:
	@$(DEPS_SH) deb
	rm -rf $(DEB_DIR)
	mkdir -p $(DEB_SRC)
	cp -R Makefile README.md example.lua src lua $(DEB_SRC)/
	mkdir -p $(DEB_SRC)/scripts
	cp scripts/deps.sh scripts/bcname.lua scripts/luamilter.service scripts/luamilter.default scripts/luamilter.8 \
	  $(DEB_SRC)/scripts/
	cp -R scripts/debian $(DEB_SRC)/debian
	cd $(DEB_SRC) && env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL dpkg-buildpackage -us -uc
	lintian --pedantic --display-info --fail-on error,warning,info,pedantic $(DEB_DIR)/luamilter_$(VERSION)_*.changes

# The package's contents and metadata (spec/deb), after building it; then
# the package installed on this machine (as root), its binary started as
# the unit would and a private Postfix delivering through it, and purged,
# leaving nothing behind (scripts/deb-install-check.sh).
deb-check: deb
	LUAMILTER_DEB_DIR=$(DEB_DIR) $(BUSTED) spec/deb
	scripts/deb-install-check.sh $(DEB_DIR)/luamilter_$(VERSION)_$$(dpkg --print-architecture).deb

uninstall:
	rm -f $(DESTDIR)$(SBINDIR)/luamilter $(DESTDIR)$(LUADIR)/milter/test.lua \
	  $(DESTDIR)$(MANDIR)/man8/luamilter.8 $(DESTDIR)$(UNITDIR)/luamilter.service \
	  $(DESTDIR)$(DATADIR)/luamilter.default $(DESTDIR)$(DATADIR)/example.lua
	-rmdir $(DESTDIR)$(LUADIR)/milter $(DESTDIR)$(DATADIR) 2>/dev/null

# C unit tests of the codec and the session (no loop, no VM).
$(B)/test_wire: spec/c/test_wire.c spec/c/fixture.c spec/c/*.h $(CORE:%=$(B)/%.o)
	$(CC) $(WARN) $(DEFS) $(CFLAGS) -Isrc -o $@ spec/c/test_wire.c spec/c/fixture.c $(CORE:%=$(B)/%.o)
$(B)/test_sess: spec/c/test_sess.c spec/c/fixture.c spec/c/*.h $(CORE:%=$(B)/%.o)
	$(CC) $(WARN) $(DEFS) $(CFLAGS) -Isrc -o $@ spec/c/test_sess.c spec/c/fixture.c $(CORE:%=$(B)/%.o)

$(B)/test_pfsim: spec/c/test_pfsim.c spec/c/fixture.c spec/c/*.h $(CORE:%=$(B)/%.o)
	$(CC) $(WARN) $(DEFS) $(CFLAGS) -Isrc -o $@ spec/c/test_pfsim.c spec/c/fixture.c $(CORE:%=$(B)/%.o)

# The header planners against each MTA's model (random lists, thousands).
$(B)/test_hplan: spec/c/test_hplan.c spec/c/*.h $(CORE:%=$(B)/%.o)
	$(CC) $(WARN) $(DEFS) $(CFLAGS) -Isrc -o $@ spec/c/test_hplan.c $(CORE:%=$(B)/%.o)

# The HTTP engine on a loop of its own against a server in the same loop.
$(B)/test_httpc: spec/c/test_httpc.c spec/c/t.h src/httpc.h src/aio.h $(B)/httpc.o $(B)/aio.o
	$(CC) $(WARN) $(DEFS) $(CFLAGS) $(LDFLAGS) -Isrc -o $@ spec/c/test_httpc.c $(B)/httpc.o $(B)/aio.o -lev -lcurl -lm

# The log line's format, against log.c alone.
$(B)/test_log: spec/c/test_log.c spec/c/t.h src/log.h $(B)/log.o
	$(CC) $(WARN) $(DEFS) $(CFLAGS) $(LDFLAGS) -Isrc -o $@ spec/c/test_log.c $(B)/log.o

check-c: $(B)/test_wire $(B)/test_sess $(B)/test_pfsim $(B)/test_hplan $(B)/test_httpc $(B)/test_log
	$(B)/test_log
	$(B)/test_wire ../shared/fixtures
	$(B)/test_sess ../shared/fixtures
	$(B)/test_pfsim ../shared/fixtures
	$(B)/test_hplan
	$(B)/test_httpc

lint:
	scripts/check-layers.sh
	luacheck -q lua spec example.lua

spec: $(B)/luamilter
	LUAMILTER_BIN=$(B)/luamilter $(BUSTED) spec/lua spec/daemon spec/bench

deps-test:
	@$(DEPS_SH) test

# The whole suite: unit and daemon tests, the Debian package, then the same
# under ASan/UBSan, a bounded fuzzing run, one valgrind run of daemon
# sessions, and end to end on Postfix and on Sendmail. (The build after
# deps-test, not beside it: under make -j two apt-get would race.)
test: deps-test
	$(MAKE) all
	$(MAKE) check-c lint spec
	$(MAKE) deb-check
	$(MAKE) asan
	$(MAKE) fuzz-check
	scripts/valgrind-check.sh build/luamilter
	$(MAKE) e2e
	$(MAKE) e2e-sendmail

# End to end with a real Postfix on loopback (installs postfix and swaks).
e2e: all
	scripts/e2e-postfix.sh

# The same cases on a real Sendmail 8.17 on loopback: Debian's sendmail-bin
# unpacked into build/sendmail-root (never installed: it conflicts with
# postfix), run from a private .cf in a temp dir.
e2e-sendmail: all
	scripts/e2e-sendmail.sh

# Sanitizer build: the C tests and the daemon specs under ASan + UBSan (with
# LeakSanitizer). Reports go to build-asan/reports/; any report fails.
SAN_REPORTS = $(CURDIR)/build-asan/reports
SAN_ENV = LUAMILTER_SANITIZED=1 ASAN_OPTIONS=log_path=$(SAN_REPORTS)/asan:detect_leaks=1:abort_on_error=1 \
	UBSAN_OPTIONS=log_path=$(SAN_REPORTS)/ubsan:print_stacktrace=1:halt_on_error=1
asan: deps-test
	@rm -rf $(SAN_REPORTS); mkdir -p $(SAN_REPORTS)
	$(SAN_ENV) $(MAKE) B=build-asan CC=clang \
	  CFLAGS="-O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all" \
	  LDFLAGS="-fsanitize=address,undefined" build-asan/luamilter check-c spec
	@if ls $(SAN_REPORTS)/* >/dev/null 2>&1; then \
	  echo "sanitizer reports:"; cat $(SAN_REPORTS)/*; exit 1; fi
	@echo "asan: no sanitizer reports"

# Fuzzing (libFuzzer): `make fuzz` runs open-ended; `make fuzz-check` (part
# of `make test`) replays the regression inputs, then fuzzes for FUZZ_SECONDS.
FUZZ_SECONDS ?= 60
FZ := build-fuzz
FZ_FLAGS := -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
FZ_SRCS := $(CORE:%=src/%.c)

$(FZ)/fuzz_sess: spec/c/fuzz_sess.c $(FZ_SRCS) src/*.h | deps-test
	@mkdir -p $(FZ)
	clang $(WARN) $(DEFS) $(FZ_FLAGS) -Isrc -o $@ spec/c/fuzz_sess.c $(FZ_SRCS)

$(FZ)/seeds/.done: scripts/fuzz-seeds.lua | deps-test
	@mkdir -p $(FZ)/seeds $(FZ)/corpus
	luajit scripts/fuzz-seeds.lua ../shared/fixtures $(FZ)/seeds
	@touch $@

fuzz: deps-test $(FZ)/fuzz_sess $(FZ)/seeds/.done
	$(FZ)/fuzz_sess -max_len=65536 -artifact_prefix=$(FZ)/ $(FZ)/corpus $(FZ)/seeds

fuzz-check: $(FZ)/fuzz_sess $(FZ)/seeds/.done
	$(FZ)/fuzz_sess spec/c/fuzz-regress/*
	@$(FZ)/fuzz_sess -max_len=65536 -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
	  -artifact_prefix=$(FZ)/ $(FZ)/corpus $(FZ)/seeds >$(FZ)/fuzz.log 2>&1; s=$$?; \
	  tail -6 $(FZ)/fuzz.log; \
	  if [ $$s -ne 0 ]; then echo "fuzzing found a crash: see $(FZ)/fuzz.log; add the input from $(FZ)/ to spec/c/fuzz-regress/"; fi; \
	  exit $$s

clean:
	rm -rf build build-asan build-fuzz
