-- luacheck: std +busted
-- --metrics: GET /metrics summed over the workers (exact values after a
-- scripted set of sessions, kept across killed workers), GET /health.
package.path = "./?.lua;" .. package.path
local U = require "spec.daemon.util"
local socket = require "socket"
local psignal = require "posix.signal"
local stdlib = require "posix.stdlib"
local now = require "spec.support.clock" -- monotonic, for waits

local SRC = U.script([[
function H.envrcpt(ctx, rcpt)
  if rcpt:find("refuse", 1, true) then return milter.reject() end
end
function H.eom(ctx)
  local r = ctx.rcpts[1]
  if r:find("reject", 1, true) then return milter.reject() end
  if r:find("tempfail", 1, true) then return milter.tempfail() end
  if r:find("discard", 1, true) then return milter.discard() end
  if r:find("fail", 1, true) then error("boom") end
  if r:find("sleep", 1, true) then milter.sleep(0.01) end
  milter.store:incr("n")
end
return H
]])

-- GET path over TCP ("inet:PORT@HOST") or a unix socket; status, body
local function get(spec, path)
  local s, ok, err
  local upath = spec:match("^unix:(.*)$")
  if upath then
    s = assert(require("socket.unix")())
    s:settimeout(2)
    ok, err = s:connect(upath)
  else
    local port, host = spec:match("^inet:(%d+)@(.*)$")
    s = assert(socket.tcp())
    s:settimeout(2)
    ok, err = s:connect(host, tonumber(port))
  end
  if not ok then s:close(); return nil, err end
  s:send("GET " .. path .. " HTTP/1.0\r\nHost: x\r\n\r\n")
  local data, e, partial = s:receive("*a")
  s:close()
  data = data or partial
  if not data or data == "" then return nil, e end
  local status = tonumber(data:match("^HTTP/1%.%d (%d+)"))
  return status, data:match("\r\n\r\n(.*)$") or ""
end

-- the samples of a /metrics body: {["name{labels}"] = number}
local function parse(body)
  local t = {}
  for line in body:gmatch("[^\n]+") do
    if not line:find("^#") then
      local k, v = line:match("^(%S+) (%S+)$")
      assert(k, "bad line: " .. line)
      t[k] = tonumber(v)
    end
  end
  return t
end

local function metrics(spec)
  local status, body = get(spec, "/metrics")
  assert.are.equal(200, status, tostring(body))
  return parse(body), body
end

-- polls until pred(metrics) holds (bounded); returns the last metrics
local function wait_metrics(spec, pred, what, timeout)
  local deadline = now() + (timeout or 5)
  local m
  repeat
    local status, body = get(spec, "/metrics")
    if status == 200 then
      m = parse(body)
      if pred(m) then return m end
    end
    socket.sleep(0.05)
  until now() >= deadline
  error("timed out waiting for " .. what)
end

local function wait_health(spec, want, timeout)
  local deadline = now() + (timeout or 5)
  local status, body
  repeat
    status, body = get(spec, "/health")
    if status == want then return body end
    socket.sleep(0.05)
  until now() >= deadline
  error(("/health: wanted %d, got %s %s"):format(want, tostring(status), tostring(body)))
end

local function workers(d)
  local f = assert(io.open(("/proc/%d/task/%d/children"):format(d.pid, d.pid)))
  local s = f:read("*a")
  f:close()
  local out = {}
  for pid in s:gmatch("%d+") do out[#out + 1] = tonumber(pid) end
  return out
end

local function session(d, rcpts, opts)
  local c = assert(d:client())
  assert(c:optneg(U.mc.OFFER.postfix))
  U.open(c)
  if opts and opts.abort then
    assert(c:mail("<s@example.org>", {}))
    assert(c:rcpt(rcpts[1]))
    c:abort()
  else
    U.message(c, { rcpts = rcpts })
  end
  c:quit()
  c:close()
end

-- the scripted sessions: 11 connections with what each one counts
local function play(d)
  session(d, { "<ok1@example.org>", "<refuse@example.org>" })
  session(d, { "<ok2@example.org>" })
  session(d, { "<ok3@example.org>" })
  session(d, { "<sleep@example.org>" })
  session(d, { "<reject1@example.org>" })
  session(d, { "<reject2@example.org>" })
  session(d, { "<tempfail@example.org>" })
  session(d, { "<discard@example.org>" })
  session(d, { "<fail@example.org>" })
  session(d, { "<abort@example.org>" }, { abort = true })
end

local EXPECT = {
  ['luamilter_connections_total'] = 11, -- the 10 and D.start's probe
  ['luamilter_connections_open'] = 0,
  ['luamilter_messages_total{verdict="accept"}'] = 4,
  ['luamilter_messages_total{verdict="reject"}'] = 2,
  ['luamilter_messages_total{verdict="tempfail"}'] = 2,
  ['luamilter_messages_total{verdict="discard"}'] = 1,
  ['luamilter_messages_total{verdict="abort"}'] = 1,
  ['luamilter_recipients_refused_total'] = 1,
  ['luamilter_handler_calls_total{event="envrcpt"}'] = 11,
  ['luamilter_handler_calls_total{event="eom"}'] = 9,
  ['luamilter_handler_calls_total{event="connect"}'] = 0,
  ['luamilter_handler_errors_total{event="eom"}'] = 1,
  ['luamilter_handler_errors_total{event="envrcpt"}'] = 0,
  ['luamilter_handler_duration_seconds_count{event="eom"}'] = 9,
  ['luamilter_handler_duration_seconds_bucket{event="eom",le="+Inf"}'] = 9,
  ['luamilter_handler_duration_seconds_count{event="envrcpt"}'] = 11,
  ['luamilter_lookups_total{kind="sleep",result="ok"}'] = 1,
  ['luamilter_lookup_duration_seconds_count{kind="sleep"}'] = 1,
  ['luamilter_lookup_duration_seconds_bucket{kind="sleep",le="0.005"}'] = 0,
  ['luamilter_lookup_duration_seconds_bucket{kind="sleep",le="10"}'] = 1,
  ['luamilter_store_operations_total{op="incr",result="ok"}'] = 4,
  ['luamilter_store_operations_total{op="get",result="ok"}'] = 0,
}

local function check(m, expect, extra)
  for k, v in pairs(expect) do
    local want = v + ((extra or {})[k] or 0)
    assert.are.equal(want, m[k], k)
  end
end

describe("--metrics", function()
  local d, spec, tmp
  before_each(function()
    tmp = assert(stdlib.mkdtemp("/tmp/luamilter-metrics-XXXXXX"))
    spec = "inet:" .. U.free_port() .. "@127.0.0.1"
    d = U.start(SRC, { args = { "--workers", "2", "--metrics", spec,
      "--store", "lmdb:" .. tmp .. "/store.mdb" } })
  end)
  after_each(function()
    d:stop()
    os.remove(tmp .. "/store.mdb")
    os.remove(tmp .. "/store.mdb-lock")
    os.remove(tmp)
  end)

  it("sums the workers' counts, which survive killed workers; counts reloads and restarts", function()
    wait_health(spec, 200)
    wait_metrics(spec, function(m)
      return m.luamilter_connections_total == 1 and m.luamilter_connections_open == 0
    end, "the start probe's connection")
    play(d)
    local m = wait_metrics(spec, function(x)
      return x.luamilter_connections_total == 11 and x.luamilter_connections_open == 0
    end, "the sessions' connections to close")
    check(m, EXPECT)
    assert.are.equal(0, m.luamilter_worker_restarts_total)
    assert.are.equal(2, m.luamilter_workers)
    assert.are.equal(2, m.luamilter_workers_ready)
    assert.are.equal(1, m.luamilter_generation)
    assert.is_true(m['luamilter_lookup_duration_seconds_sum{kind="sleep"}'] >= 0.009)

    -- kill -9 each worker in turn: every count it made stays, each
    -- restart is counted, and the replacements count on
    for round = 1, 2 do
      local pids = workers(d)
      assert.are.equal(2, #pids)
      assert.are.equal(0, psignal.kill(pids[1], psignal.SIGKILL))
      m = wait_metrics(spec, function(x)
        return x.luamilter_worker_restarts_total == round and x.luamilter_workers_ready == 2
      end, "restart " .. round, 8)
      check(m, EXPECT)
    end
    wait_health(spec, 200)
    session(d, { "<ok4@example.org>" })
    session(d, { "<ok5@example.org>" })
    m = wait_metrics(spec, function(x)
      return x.luamilter_connections_total == 13 and x.luamilter_connections_open == 0
    end, "two more sessions")
    check(m, EXPECT, {
      luamilter_connections_total = 2,
      ['luamilter_messages_total{verdict="accept"}'] = 2,
      ['luamilter_handler_calls_total{event="envrcpt"}'] = 2,
      ['luamilter_handler_calls_total{event="eom"}'] = 2,
      ['luamilter_handler_duration_seconds_count{event="eom"}'] = 2,
      ['luamilter_handler_duration_seconds_bucket{event="eom",le="+Inf"}'] = 2,
      ['luamilter_handler_duration_seconds_count{event="envrcpt"}'] = 2,
      ['luamilter_store_operations_total{op="incr",result="ok"}'] = 2,
    })

    -- a reload, then one that fails
    assert(d:signal("HUP"))
    m = wait_metrics(spec, function(x)
      return x['luamilter_reloads_total{result="ok"}'] == 1
    end, "the reload")
    assert.are.equal(2, m.luamilter_generation)
    d:rewrite_script("return 42\n")
    assert(d:signal("HUP"))
    m = wait_metrics(spec, function(x)
      return x['luamilter_reloads_total{result="failed"}'] == 1
    end, "the failed reload")
    assert.are.equal(2, m.luamilter_generation)
    assert.are.equal(1, m['luamilter_reloads_total{result="ok"}'])
  end)

  it("has the usual shape: HELP and TYPE lines, cumulative buckets", function()
    wait_health(spec, 200)
    local _, body = metrics(spec)
    assert.truthy(body:find("# TYPE luamilter_messages_total counter\n", 1, true))
    assert.truthy(body:find("# TYPE luamilter_handler_duration_seconds histogram\n", 1, true))
    assert.truthy(body:find('luamilter_handler_duration_seconds_bucket{event="eom",le="0.001"} 0\n', 1, true))
    local status = get(spec, "/nothing")
    assert.are.equal(404, status)
  end)

  it("/health is 200, 503 while a worker is stopped, then 200 again", function()
    wait_health(spec, 200)
    local pid = workers(d)[2]
    assert.are.equal(0, psignal.kill(pid, psignal.SIGSTOP))
    local body = wait_health(spec, 503)
    assert.truthy(body:find("is stopped", 1, true), body)
    local m = metrics(spec)
    assert.are.equal(1, m.luamilter_workers_ready)
    assert.are.equal(0, psignal.kill(pid, psignal.SIGCONT))
    wait_health(spec, 200)
    assert.are.equal(0, metrics(spec).luamilter_worker_restarts_total)
  end)
end)

describe("--metrics on a unix socket", function()
  it("serves there, and the socket goes with the daemon", function()
    local tmp = assert(stdlib.mkdtemp("/tmp/luamilter-metrics-XXXXXX"))
    local spec = "unix:" .. tmp .. "/metrics.sock"
    local d = U.start(SRC, { args = { "--metrics", spec, "--store", "lmdb:" .. tmp .. "/s.mdb" } })
    finally(function() d:stop() end)
    wait_health(spec, 200)
    local m = metrics(spec)
    assert.are.equal(1, m.luamilter_workers)
    d:stop()
    assert.is_nil(io.open(tmp .. "/metrics.sock"), "socket left behind")
    for _, f in ipairs({ "/s.mdb", "/s.mdb-lock" }) do os.remove(tmp .. f) end
    os.remove(tmp)
  end)

  it("refuses a spec it cannot bind", function()
    local r = U.D.run({ "--metrics", "bogus:1", "-l", "unix:/tmp/luamilter-nope.sock", "example.lua" })
    assert.are.equal(1, r.status)
    assert.truthy(r.stderr:find("--metrics bogus:1", 1, true), r.stderr)
  end)
end)
