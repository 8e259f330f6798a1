-- Correctness of the benchmark tool (scripts/bench, build/bench/benchgen,
-- build/bench/benchref): no timings are checked, only that runs against a
-- correct server are clean and that wrong servers are caught.
--
-- Run: luajit /usr/bin/busted spec/bench   (LUAMILTER_BIN picks the binary;
-- default build/luamilter). Every wait is bounded.
package.path = "./?.lua;" .. package.path

local unistd = require "posix.unistd"
local fcntl = require "posix.fcntl"
local psignal = require "posix.signal"
local pwait = require "posix.sys.wait"
local stdlib = require "posix.stdlib"
local socket = require "socket"
local D = require "spec.support.daemon"
local now = require "spec.support.clock" -- monotonic, for waits

local BENCH = "scripts/bench"
local GEN = "build/bench/benchgen"

local function read_file(path)
  local f = io.open(path, "rb")
  if not f then return "" end
  local s = f:read("*a")
  f:close()
  return s
end

-- runs argv with stdout/stderr to files; returns {status, out, err,
-- timed_out}. A run past the deadline gets SIGTERM (scripts/bench then
-- stops its servers), then SIGKILL.
local function run(argv, timeout)
  local dir = assert(stdlib.mkdtemp("/tmp/luamilter-benchspec-XXXXXX"))
  local out_path, err_path = dir .. "/out", dir .. "/err"
  local pid = assert(unistd.fork())
  if pid == 0 then
    local flags = fcntl.O_WRONLY + fcntl.O_CREAT + fcntl.O_TRUNC
    local nul = fcntl.open("/dev/null", fcntl.O_RDONLY)
    unistd.dup2(nul, 0)
    unistd.dup2(fcntl.open(out_path, flags, 420), 1)
    unistd.dup2(fcntl.open(err_path, flags, 420), 2)
    for fd = 3, 1023 do unistd.close(fd) end
    local args = {}
    for i = 2, #argv do args[i - 1] = argv[i] end
    unistd.execp(argv[1], args)
    unistd._exit(127)
  end
  local res = {}
  local deadline = now() + (timeout or 60)
  local signalled = nil
  while true do
    local p, how, code = pwait.wait(pid, pwait.WNOHANG)
    if p == pid then
      res.status, res.how = code, how
      break
    end
    if now() > deadline then
      if not signalled then
        res.timed_out = true
        psignal.kill(pid, psignal.SIGTERM)
        signalled = now()
      elseif now() > signalled + 10 then
        psignal.kill(pid, psignal.SIGKILL)
      end
    end
    socket.sleep(0.02)
  end
  res.out, res.err = read_file(out_path), read_file(err_path)
  os.remove(out_path); os.remove(err_path); unistd.rmdir(dir)
  return res
end

local function show(res)
  return "exit " .. tostring(res.status) .. (res.timed_out and " (timed out)" or "") ..
    "\n--- stdout\n" .. res.out .. "\n--- stderr\n" .. res.err
end

-- the per-run progress lines of scripts/bench: {server, msgs, errors}
local function runs(out)
  local list = {}
  for server, msgs, errors in out:gmatch("(%S+) +msgs=(%d+) [^\n]- errors=(%d+)") do
    list[#list + 1] = { server = server, msgs = tonumber(msgs), errors = tonumber(errors) }
  end
  return list
end

-- writes a line of the raw results a --keep run leaves (for --summary-of)
local function result_row(f, key, round, server, rate, other)
  f:write(("sect=scenario key=%s round=%d server=%s msgs=10 rate=%d p50_ms=1 p99_ms=2 mean_ms=1 "
    .. "cpu_per_1k=0.01 srv_util=0.5 gen_util=0.5 other_util=%s errors=0 hwm_kb=100\n")
    :format(key, round, server, rate, other))
end

-- key=value fields of benchgen's RESULT line
local function result(out)
  local line = out:match("RESULT ([^\n]*)")
  assert(line, "no RESULT line in:\n" .. out)
  local f = {}
  for k, v in line:gmatch("(%S+)=(%S+)") do f[k] = tonumber(v) or v end
  return f
end

describe("scripts/bench", function()
  setup(function()
    local res = run({ BENCH, "--build-only" }, 120)
    assert(res.status == 0, "building the bench tools failed: " .. show(res))
  end)

  it("a --quick run against luamilter and the reference has no errors", function()
    local res = run({ BENCH, "--quick" }, 120)
    assert.are.equal(0, res.status, show(res))
    local got = runs(res.out)
    assert.are.equal(2, #got, show(res))
    assert.are.same({ "reference", "luamilter" }, { got[1].server, got[2].server })
    for _, r in ipairs(got) do
      assert.are.equal(24, r.msgs, show(res))
      assert.are.equal(0, r.errors, show(res))
    end
    -- the reference negotiated what luamilter asked for; the summary has ratios
    assert.truthy(res.out:find("luamilter negotiated protocol 0x%x+ actions 0x%x+\n  reference: the same\n"),
      show(res))
    assert.truthy(res.out:find("lua/ref", 1, true), show(res))
    assert.falsy(res.err:find("error", 1, true), show(res))
  end)

  it("--store lmdb and --store redis --quick: store, per-worker and no-count runs in the same rounds, no errors",
    function()
    for _, backend in ipairs { "lmdb", "redis" } do
      local res = run({ BENCH, "--quick", "--store", backend, "--workers", "2" }, 120)
      assert.are.equal(0, res.status, show(res))
      local got = runs(res.out)
      assert.are.equal(3, #got, show(res))
      assert.are.same({ "no-count", "per-worker", "luamilter" }, { got[1].server, got[2].server, got[3].server })
      for _, r in ipairs(got) do
        assert.are.equal(24, r.msgs, show(res))
        assert.are.equal(0, r.errors, show(res))
      end
      assert.truthy(res.out:find("luamilter: one store:incr per message on " .. backend, 1, true), show(res))
      assert.truthy(res.out:find("\n  store/none +[%d.]+x"), show(res))
      assert.truthy(res.out:find("\n  store/wkr +[%d.]+x"), show(res))
      -- no C reference runs beside them
      assert.falsy(res.out:find("reference", 1, true), show(res))
    end
  end)

  it("--store: every round runs new server processes", function()
    local res = run({ BENCH, "--store", "lmdb", "--workers", "2", "--rounds", "2", "--messages", "24",
      "--concurrency", "2", "--msgs-per-conn", "3", "--headers", "3", "--keep" }, 120)
    local kept = res.err:match("bench: kept (%S+)")
    local raw = kept and read_file(kept .. "/results") or ""
    if kept then os.execute("rm -rf " .. kept) end
    assert.are.equal(0, res.status, show(res))
    local pids, seen, n = {}, {}, 0
    for round, server, pid in raw:gmatch("round=(%d+) server=(%S+) pid=(%d+)") do
      pids[server .. "/" .. round] = pid
      assert.is_nil(seen[pid], "pid " .. pid .. " ran twice:\n" .. raw)
      seen[pid], n = true, n + 1
    end
    assert.are.equal(6, n, raw)
    for _, server in ipairs { "no-count", "per-worker", "luamilter" } do
      assert.truthy(pids[server .. "/1"] and pids[server .. "/2"], raw)
    end
  end)

  it("even rounds run the servers in the reverse order", function()
    local res = run({ BENCH, "--refs", "mre", "--rounds", "3", "--messages", "24", "--concurrency", "2",
      "--msgs-per-conn", "3", "--headers", "3" }, 120)
    assert.are.equal(0, res.status, show(res))
    local names = {}
    for i, r in ipairs(runs(res.out)) do names[i] = r.server end
    assert.are.same({ "ref-mre", "luamilter", "luamilter", "ref-mre", "ref-mre", "luamilter" }, names, show(res))
  end)

  it("--ref-eom-only: the reference answers BODYEOB only, and runs clean", function()
    local res = run({ BENCH, "--quick", "--only", "ref", "--ref-eom-only" }, 120)
    assert.are.equal(0, res.status, show(res))
    assert.truthy(res.out:find("answers BODYEOB only", 1, true), show(res))
    local got = runs(res.out)
    assert.are.equal(1, #got, show(res))
    assert.are.equal("ref-eom", got[1].server, show(res))
    assert.are.equal(24, got[1].msgs, show(res))
    assert.are.equal(0, got[1].errors, show(res))
  end)

  it("--refs every,mre,eom: three references with the flags they name, one luamilter, ratios to each", function()
    local res = run({ BENCH, "--quick", "--refs", "every,mre,eom" }, 120)
    assert.are.equal(0, res.status, show(res))
    local got = runs(res.out)
    local names = {}
    for i, r in ipairs(got) do
      names[i] = r.server
      assert.are.equal(24, r.msgs, show(res))
      assert.are.equal(0, r.errors, show(res))
    end
    assert.are.same({ "ref-every", "ref-mre", "ref-eom", "luamilter" }, names, show(res))
    local lua = tonumber(res.out:match("luamilter negotiated protocol (0x%x+)"))
    local every = tonumber(res.out:match("\n  ref%-every: protocol (0x%x+): answers every event it receives"))
    local mre = tonumber(res.out:match("\n  ref%-mre: protocol (0x%x+): answers MAIL, RCPT and BODYEOB only"))
    local eom = tonumber(res.out:match("\n  ref%-eom: protocol (0x%x+): answers BODYEOB only"))
    assert(lua and every and mre and eom, show(res))
    local NR_ALL, NR_MAIL_RCPT = 0xff080, 0xc000
    -- every event luamilter receives, each one answered
    assert.are.equal(bit.band(lua, bit.bnot(NR_ALL)), every, show(res))
    -- the same events, only MAIL, RCPT and BODYEOB answered
    assert.are.equal(bit.bor(every, NR_ALL - NR_MAIL_RCPT), mre, show(res))
    assert.are.equal(bit.bor(every, NR_ALL), eom, show(res))
    for _, label in ipairs { "lua/every", "lua/mre", "lua/eom" } do
      assert.truthy(res.out:find("\n  " .. label:gsub("%p", "%%%0") .. " +[%d.]+x"), label .. "\n" .. show(res))
    end
  end)

  it("a timed run judges the MAIL/RCPT/eom target and the same-flags targets, each once per scenario", function()
    local res = run({ BENCH, "--refs", "mre,same", "--concurrency", "2", "--msgs-per-conn", "3",
      "--headers", "3", "--rounds", "1", "--duration", "0.5", "--warmup", "0", "--retries", "0" }, 120)
    assert.are.equal(0, res.status, show(res))
    local mre = "\n  target %(4 KiB%): msgs/s >= 0%.80x the MAIL/RCPT/eom reference: [NOT ]*met %([%d.]+x%)"
    local _, n = res.out:gsub(mre, "")
    assert.are.equal(1, n, show(res))
    _, n = res.out:gsub("\n  targets %(4 KiB%): msgs/s >= 0%.80x: [NOT ]*met %([%d.]+x%), p99 <= 1%.50x: ", "")
    assert.are.equal(1, n, show(res))
  end)

  it("--summary-of: a round others disturbed is left out of the medians where its server had quiet ones", function()
    local dir = assert(stdlib.mkdtemp("/tmp/luamilter-benchspec-XXXXXX"))
    local path = dir .. "/results"
    local f = assert(io.open(path, "w"))
    local function row(round, server, rate, other)
      result_row(f, "c=8,b=4K,m=10,r=2,h=10", round, server, rate, other)
    end
    -- the reference: one disturbed round (100) and two quiet ones; luamilter:
    -- every round disturbed, so all of them count
    row(1, "ref-mre", 100, "0.90"); row(2, "ref-mre", 1000, "0.10"); row(3, "ref-mre", 1200, "0.00")
    row(1, "luamilter", 900, "0.50"); row(2, "luamilter", 700, "0.40"); row(3, "luamilter", 880, "0.30")
    f:close()
    local res = run({ BENCH, "--refs", "mre", "--summary-of", path }, 30)
    os.execute("rm -rf " .. dir)
    assert.are.equal(0, res.status, show(res))
    assert.truthy(res.out:find("\n  ref%-mre +1100 "), show(res))   -- median of 1000 and 1200
    assert.truthy(res.out:find("\n  luamilter +880 "), show(res))   -- median of all three
    assert.truthy(res.out:find("lua/mre +0%.80x"), show(res))
    assert.truthy(res.out:find("note: 1 round(s) during which other processes", 1, true), show(res))
    assert.truthy(res.out:find("note: in 1 scenario(s) a server had no quiet round", 1, true), show(res))
  end)

  it("--summary-of with --store lmdb: the store run against the no-count and per-worker runs, and the 0.9x target",
    function()
    local dir = assert(stdlib.mkdtemp("/tmp/luamilter-benchspec-XXXXXX"))
    local path = dir .. "/results"
    local f = assert(io.open(path, "w"))
    local function row(key, round, server, rate)
      result_row(f, key, round, server, rate, "0.00")
    end
    local met, missed = "c=8,b=4K,m=10,r=2,h=10", "c=64,b=4K,m=10,r=2,h=10"
    -- medians: no-count 1000, per-worker 1200, luamilter 950 (met) and 855 (missed)
    for r, rates in ipairs { { 1000, 1200, 950 }, { 1100, 1300, 900 }, { 900, 1100, 1000 } } do
      row(met, r, "no-count", rates[1]); row(met, r, "per-worker", rates[2]); row(met, r, "luamilter", rates[3])
      row(missed, r, "no-count", rates[1]); row(missed, r, "per-worker", rates[2])
      row(missed, r, "luamilter", rates[3] * 0.9)
    end
    f:close()
    local res = run({ BENCH, "--store", "lmdb", "--summary-of", path }, 30)
    assert.are.equal(0, res.status, show(res))
    local target = "target %(4 KiB%): msgs/s with the store on LMDB >= 0%.90x the same policy without it: "
    assert.truthy(res.out:find(met .. "\n  no%-count +1000 .-\n  per%-worker +1200 .-\n  luamilter +950 .-"
      .. "\n  store/none +0%.95x .-\n  store/wkr +0%.79x"), show(res))
    assert.truthy(res.out:find(target .. "met %(0%.95x%)"), show(res))
    assert.truthy(res.out:find(target .. "NOT met %(0%.85x%)"), show(res))
    -- on Redis there is no target, only the ratio
    f = assert(io.open(path, "w")); row(met, 1, "no-count", 1000); row(met, 1, "luamilter", 500); f:close()
    res = run({ BENCH, "--store", "redis", "--summary-of", path }, 30)
    os.execute("rm -rf " .. dir)
    assert.are.equal(0, res.status, show(res))
    assert.truthy(res.out:find("store/none +0%.50x"), show(res))
    assert.falsy(res.out:find("target", 1, true), show(res))
  end)

  it("scripts/bench-callgrind --store lmdb: counts per message for the three servers, the store's above the rest",
    function()
    if os.getenv("LUAMILTER_SANITIZED") then
      -- valgrind cannot run an ASan binary; the plain build's run covers the tool
      pending("skipped under sanitizers: callgrind runs the plain build")
      return
    end
    local res = run({ "scripts/bench-callgrind", "--store", "lmdb", "--messages", "1000", "--warmup", "300" }, 300)
    assert.are.equal(0, res.status, show(res))
    local rows = {}
    for name, ir, i1 in res.out:gmatch("\n  (%S+) +(%d+) +([%d.]+) +[%d.]+ +[%d.]+ +[%d.]+ +%d+") do
      rows[name] = { ir = tonumber(ir), i1 = tonumber(i1) }
    end
    for _, name in ipairs { "no-count", "per-worker", "luamilter" } do
      local r = rows[name]
      assert.truthy(r, name .. " has no row: " .. show(res))
      -- a whole message: tens of thousands of instructions, not a probe's few
      assert.is_true(r.ir > 10000, show(res))
    end
    -- the store's write transaction is thousands of instructions, and its
    -- code more than doubles the worker's code-cache misses: a run whose
    -- worker missed LUAMILTER_BENCH_STORE (or its --store), or without the
    -- cache simulation, fails here
    assert.is_true(rows.luamilter.ir > rows["no-count"].ir + 1500, show(res))
    assert.is_true(rows.luamilter.i1 > 1.5 * rows["no-count"].i1, show(res))
    assert.truthy(res.out:find("\n  store/none +[%d.]+x"), show(res))
    assert.truthy(res.out:find("\n  wkr/none +[%d.]+x"), show(res))
    -- a Redis server's work would not be counted: refused
    res = run({ "scripts/bench-callgrind", "--store", "redis" }, 60)
    assert.are.equal(2, res.status, show(res))
    assert.truthy(res.err:find("--store takes lmdb", 1, true), show(res))
  end)

  it("--refs rejects a reference it does not know", function()
    local res = run({ BENCH, "--quick", "--refs", "every,bogus" }, 60)
    assert.are.equal(2, res.status, show(res))
    assert.truthy(res.err:find("--refs: unknown reference 'bogus'", 1, true), show(res))
  end)

  it("detects wrong replies: a reference answering 'r' to every 3rd RCPT", function()
    local res = run({ BENCH, "--quick", "--only", "ref", "--ref-fault", "reject-rcpt:3" }, 120)
    assert.are.equal(1, res.status, show(res))
    local got = runs(res.out)
    assert.are.equal(1, #got, show(res))
    assert.is_true(got[1].errors > 0, show(res))
    assert.is_true(got[1].msgs < 24, show(res))
    assert.truthy(res.err:find("error wrong_reply: .- RCPT answered with 'r'"), show(res))
    assert.truthy(res.out:find("ERRORS", 1, true), show(res))
  end)

  it("detects a missing reply as a timeout", function()
    local res = run({ BENCH, "--quick", "--only", "ref", "--ref-fault", "drop-reply:4",
      "--messages", "8", "--timeout", "0.5" }, 120)
    assert.are.equal(1, res.status, show(res))
    local got = runs(res.out)
    assert.is_true(got[1].errors > 0, show(res))
    assert.truthy(res.err:find("error timeout: .- at RCPT: no reply within 0.5s"), show(res))
  end)

  it("detects a missing header with --expect-header, and only with it", function()
    local res = run({ BENCH, "--quick", "--only", "ref", "--ref-fault", "no-header" }, 120)
    assert.are.equal(1, res.status, show(res))
    local got = runs(res.out)
    assert.are.equal(24, got[1].errors, show(res))
    assert.are.equal(0, got[1].msgs, show(res))
    assert.truthy(res.err:find("error missing_header: .- no ADDHEADER X%-Bench"), show(res))

    res = run({ BENCH, "--quick", "--only", "ref", "--ref-fault", "no-header", "--expect-header", "" }, 120)
    assert.are.equal(0, res.status, show(res))
    assert.are.equal(0, runs(res.out)[1].errors, show(res))
  end)

  it("--body-sweep --quick runs bodies with and without a Lua body handler cleanly", function()
    local res = run({ BENCH, "--quick", "--body-sweep" }, 120)
    assert.are.equal(0, res.status, show(res))
    local got = runs(res.out)
    assert.are.equal(8, #got, show(res)) -- 2 sizes x 2 variants x 2 servers
    for _, r in ipairs(got) do
      assert.are.equal(24, r.msgs, show(res))
      assert.are.equal(0, r.errors, show(res))
    end
    -- with the body handler luamilter asks for BODY events (no NOBODY bit)
    local proto = res.out:match("\n  body handler: luamilter negotiated protocol (0x%x+)")
    assert.truthy(proto, show(res))
    assert.are.equal(0, bit.band(tonumber(proto), 0x10), show(res))
  end)

  it("--idle opens and holds sessions against both servers", function()
    local res = run({ BENCH, "--quick", "--idle", "40" }, 120)
    assert.are.equal(0, res.status, show(res))
    for _, name in ipairs({ "reference", "luamilter" }) do
      local open = res.out:match("\n" .. name .. "%s+40%s+[%d.]+ MB%s+[%d.]+ MB%s+[%d.]+%s+(%d+)")
      assert.are.equal("40", open, show(res))
    end
  end)
end)

describe("benchgen against luamilter with other scripts", function()
  local d

  after_each(function()
    if d then d:stop(); d = nil end
  end)

  it("sends BODY reply-free where luamilter asks (NR_BODY): a skip is kept, the header still comes", function()
    local err
    d, err = D.start([[
local milter = require "milter"
return {
  body = function(ctx, chunk)
    ctx.msg.chunks = (ctx.msg.chunks or 0) + 1
    return milter.skip()
  end,
  eom = function(ctx)
    return milter.accept{ add_header = { { "X-Chunks", tostring(ctx.msg.chunks) } } }
  end,
}
]], { args = { "--log-level", "warn" } })
    assert(d, err)
    -- 200 KiB bodies are 4 BODY packets, none of them answered
    local res = run({ GEN, "-s", d.listen, "-c", "3", "-m", "2", "-n", "12", "-b", "200K",
      "-e", "X-Chunks", "-T", "5" }, 60)
    assert.are.equal(0, res.status, show(res))
    local f = result(res.out)
    assert.are.equal(12, f.msgs, show(res))
    assert.are.equal(0, f.errors, show(res))
    -- NR_BODY negotiated, so SKIP is not (nothing answers a BODY)
    assert.are.equal(0x80000, bit.band(tonumber(f.protocol), 0x80000), show(res))
    assert.are.equal(0, bit.band(tonumber(f.protocol), 0x400), show(res))
    assert.falsy(d:log():find("protocol error", 1, true), d:log())
  end)

  it("--helper-pid: the helper's CPU is reported as helper_util and left out of other_util", function()
    local err
    d, err = D.start([[
return { eom = function() end }
]], { args = { "--log-level", "warn" } })
    assert(d, err)
    local function gen(extra)
      local argv = { GEN, "-s", d.listen, "-c", "4", "-n", "20000", "-e", "", "-T", "5", "-p", tostring(d.pid) }
      for _, a in ipairs(extra) do argv[#argv + 1] = a end
      local res = run(argv, 60)
      assert.are.equal(0, res.status, show(res))
      return result(res.out), res
    end
    local f, res = gen {}
    assert.are.equal(0, f.helper_util, show(res))
    -- the server itself as its own helper: the same CPU, read at the same
    -- moments (to a few clock ticks and the printed rounding)
    f, res = gen { "--helper-pid", tostring(d.pid) }
    assert.are.equal(20000, f.msgs, show(res))
    assert.is_true(f.srv_cpu > 0, show(res))
    local helper = f.helper_util * f.secs
    assert.is_true(helper >= f.srv_cpu / 2, show(res))
    assert.is_true(math.abs(helper - f.srv_cpu) <= 0.05 + 0.1 * f.srv_cpu, show(res))
  end)

  it("flags a verdict other than continue as a wrong reply", function()
    local err
    d, err = D.start([[
local milter = require "milter"
return {
  header = function(ctx, name)
    if name == "Subject" then return milter.tempfail{} end
  end,
}
]], { args = { "--log-level", "warn" } })
    assert(d, err)
    local res = run({ GEN, "-s", d.listen, "-c", "1", "-m", "1", "-n", "3", "-T", "5" }, 60)
    assert.are.equal(1, res.status, show(res))
    local f = result(res.out)
    assert.are.equal(0, f.msgs, show(res))
    assert.are.equal(3, f.err_wrong_reply, show(res))
    -- the header's verdict is kept and given at end of message
    assert.truthy(res.err:find("BODYEOB answered with 't'", 1, true), show(res))
  end)
end)
