-- luacheck: std +busted
-- Process lifecycle of the real daemon: reload on SIGHUP (generations, open
-- sessions keep their script, broken scripts refused once), several workers
-- and their supervisor, stop on SIGTERM/SIGINT, --pidfile, --daemon,
-- --user/--group.  The policy scripts (lifecycle_util.lua) answer every step
-- with their own tag, so a session proves by content which script served it.
package.path = "./?.lua;" .. package.path
local U = require "spec.daemon.util"
local L = require "spec.daemon.lifecycle_util"
local D = U.D
local mc = U.mc
local socket = require "socket"
local unistd = require "posix.unistd"
local pstat = require "posix.sys.stat"
local pwd = require "posix.pwd"
local grp = require "posix.grp"

local A, B, C = L.policy("A"), L.policy("B"), L.policy("C")

local function pesc(s) return (s:gsub("%p", "%%%0")) end

local function abs(path)
  if path:sub(1, 1) == "/" then return path end
  return unistd.getcwd() .. "/" .. path
end

local function lines(list) return table.concat(list, "\n") end

-- starts the daemon with n workers at log level debug; waits for the
-- workers; returns the daemon, its log tail and the worker pids
local function start(src, n, args, opts)
  local argv = { "--workers", tostring(n), "--log-level", "debug" }
  for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
  opts = opts or {}
  opts.args = argv
  local d = U.start(src, opts)
  local workers = L.wait_workers(d.pid, n, d.log_path, 5)
  assert(workers, "the supervisor did not start " .. n .. " worker(s):\n" .. d:log())
  return d, L.tail(d.log_path), workers
end

-- rewrites the script and sends SIGHUP; returns the new generation once the
-- supervisor logged "reloaded PATH: generation N"
local function reload(d, tail, src)
  local from = #tail:poll().lines + 1
  d:rewrite_script(src)
  assert(d:signal("HUP"))
  local i, gen = tail:wait("reloaded " .. pesc(d.script_path) .. ": generation (%d+)$", from, 5, 0.001)
  assert(i, "no 'reloaded ...: generation N' line:\n" .. d:log())
  return tonumber(gen)
end

-- rewrites the script with a broken one, SIGHUP; returns the generation the
-- failure line says keeps serving, and the error text
local function failed_reload(d, tail, src)
  local from = #tail:poll().lines + 1
  d:rewrite_script(src)
  assert(d:signal("HUP"))
  local i, gen, err = tail:wait("reload failed, generation (%d+) keeps serving: (.*)$", from, 5)
  assert(i, "no 'reload failed' line:\n" .. d:log())
  return tonumber(gen), err
end

-- a whole session that must succeed; returns its tag (timeout: for the
-- replies, 5 s unless given)
local function session_tag(listen, timeout)
  local s = L.session(listen, { timeout = timeout })
  assert(not s.error, "session failed: " .. tostring(s.error))
  return s.tag
end

-- polls sessions until one shows the tag (bounded); returns the last tag
local function wait_tag(listen, tag, timeout)
  local last
  L.wait_until(function()
    last = L.session(listen).tag
    return last == tag
  end, timeout or 3, 0.05)
  return last
end

-- sends RCPT <hold:flag> without reading the reply, waits for the handler's
-- "HOLD TAG pid=N" line; returns tag, pid
local function hold(c, tail, flag, from)
  assert(c:macro("R", { { "{rcpt_addr}", "hold" } }))
  assert(c:send("R", "<hold:" .. flag .. ">\0"))
  local i, tag, pid = tail:wait("HOLD (%S+) pid=(%d+)$", from, 5)
  assert(i, "the handler did not start holding")
  return tag, tonumber(pid), i
end

-- the reply to a held RCPT: the tag and pid it names
local function held_reply(c)
  local r, err = c:read_reply(8)
  assert(r, "no reply to the held RCPT: " .. tostring(err))
  assert.are.equal("y", r.cmd)
  local tag, pid = r.text:match("^550 5%.7%.1 gen%-(%S+) pid=(%d+)$")
  assert(tag, "unexpected reply " .. tostring(r.text))
  return tag, tonumber(pid)
end

-- connection log lines "[c=ID g=GEN ...] [lua] file:line: TAG X"
local function tag_lines(tail)
  local out = {}
  for _, line in ipairs(tail:poll().lines) do
    local cid, gen, tag = line:match("%[c=(%d+) g=(%d+)[^%]]*%] %[lua%] .-: TAG (%S+)$")
    if cid then out[#out + 1] = { cid = tonumber(cid), gen = tonumber(gen), tag = tag, line = line } end
  end
  return out
end

local function set(list)
  local s = {}
  for _, v in ipairs(list) do s[v] = true end
  return s
end

describe("reload (SIGHUP)", function()
  local d

  after_each(function()
    if d then d:stop(); d = nil end
  end)

  it("a session in flight finishes on the script it started with; new connections get the new one", function()
    local tail, workers
    d, tail, workers = start(A, 2)
    local c1 = assert(d:client())
    finally(function() c1:close() end)
    assert(L.open(c1))
    assert.are.equal("A", assert(L.begin_message(c1))) -- stopped after RCPT

    assert.are.equal(2, reload(d, tail, B))
    assert(tail:wait_workers(workers, 2, 10), "not every worker serves generation 2:\n" .. d:log())
    assert.are.equal("B", session_tag(d.listen))

    -- the rest of c1's message, and a second message on it: still A
    assert.are.equal("A", assert(L.end_message(c1)))
    assert.are.equal("A", assert(L.message(c1)))
    c1:quit()
    c1:close()
    assert.are.equal("B", session_tag(d.listen))

    -- every connection's log lines carry its generation
    local tl = tag_lines(tail)
    assert.are.equal(4, #tl, lines(tail.lines))
    local a_conn
    for _, t in ipairs(tl) do
      assert.are.equal(t.tag == "A" and 1 or 2, t.gen, t.line)
      if t.tag == "A" then a_conn = t.cid end
    end
    assert(tail:wait("%[c=" .. a_conn .. " g=1[ %]].*closed after", 1, 5),
      "c1's close line does not carry generation 1:\n" .. lines(tail.lines))
    assert.are.equal(0, #tail:grep(" ERROR "), d:log())
  end)

  it("a script that fails to load is logged once with file:line and the previous one keeps serving", function()
    local tail, workers
    d, tail, workers = start(A, 3)
    for _, b in ipairs(L.BROKEN) do
      local gen, err = failed_reload(d, tail, b[2])
      assert.are.equal(1, gen, b[1])
      assert(err:find(d.script_path .. b[3], 1, true), b[1] .. ": no file:line in: " .. err)
      for _ = 1, 6 do assert.are.equal("A", session_tag(d.listen), b[1]) end
    end
    socket.sleep(0.3) -- room for any per-worker report to arrive
    local errs = tail:grep(" ERROR ")
    assert.are.equal(#L.BROKEN, #errs, "expected one error line per failed reload:\n" .. lines(errs))
    for _, l in ipairs(errs) do assert(l:find("reload failed", 1, true), l) end
    -- failed loads took no generation number; the workers never changed
    assert.are.equal(2, reload(d, tail, B))
    assert(tail:wait_workers(workers, 2, 10), "not every worker serves generation 2:\n" .. d:log())
    assert.are.equal("B", session_tag(d.listen))
    assert.are.same(workers, L.children(d.pid))
  end)

  it("a reload reaches every worker", function()
    local tail, workers
    d, tail, workers = start(A, 3)
    assert.are.equal(2, reload(d, tail, B))
    socket.sleep(0.3) -- the idle workers take the signal at once
    -- a connection parked inside a handler keeps its worker from accepting,
    -- so each next connection lands on a worker not parked yet
    local flag = d.dir .. "/release"
    local held, pids, from = {}, {}, 1
    finally(function()
      L.write(flag, "")
      for _, c in ipairs(held) do c:close() end
    end)
    for k = 1, 3 do
      local c = assert(d:client())
      held[k] = c
      assert(L.open(c))
      assert.are.equal("B", assert(L.begin_message(c)))
      local tag, pid, i = hold(c, tail, flag, from)
      from = i + 1
      assert.are.equal("B", tag, "worker " .. pid .. " still serves the old script")
      pids[#pids + 1] = pid
    end
    table.sort(pids)
    assert.are.same(workers, pids)
    L.write(flag, "")
    for k = 1, 3 do
      local tag, pid = held_reply(held[k])
      assert.are.equal("B", tag)
      assert(set(workers)[pid])
      assert.are.equal("B", assert(L.end_message(held[k])))
    end
  end)

  -- The supervisor checks the file it read; a worker must serve that script,
  -- not whatever the file holds when the worker gets round to reloading.
  for _, v in ipairs({ { "another script", C }, { "a broken script", L.BROKEN[1][2] } }) do
    it("a worker busy during a reload serves the checked script even when the file changes again (" ..
        v[1] .. " written, no SIGHUP)", function()
      local tail, workers
      d, tail, workers = start(A, 1)
      local flag = d.dir .. "/release"
      local c = assert(d:client())
      finally(function() L.write(flag, ""); c:close() end)
      assert(L.open(c))
      assert.are.equal("A", assert(L.begin_message(c)))
      hold(c, tail, flag, 1) -- the only worker is busy in a handler

      assert.are.equal(2, reload(d, tail, B))
      L.replace(d.script_path, v[2]) -- edited again, not reloaded
      L.write(flag, "")
      assert.are.equal("A", (held_reply(c)))
      assert.are.equal("A", assert(L.end_message(c)))
      c:quit()
      c:close()
      assert(tail:wait_workers(workers, 2, 10), "not every worker serves generation 2:\n" .. d:log())

      assert.are.equal("B", session_tag(d.listen), "generation 2 is the script checked at the reload")
      local errs = tail:grep(" ERROR ")
      assert.are.equal(0, #errs, "no reload failed, yet:\n" .. lines(errs))
      for _, t in ipairs(tag_lines(tail)) do
        assert.are.equal(t.tag == "A" and 1 or 2, t.gen, t.line)
      end
    end)
  end

  it("under a continuous stream of sessions from 4 clients, alternating good and broken scripts, " ..
      "no message fails or is mis-answered", function()
    local tail, workers
    d, tail, workers = start(L.policy("v1"), 3)
    local stop = d.dir .. "/stop"
    local clients = {}
    finally(function()
      L.write(stop, "")
      for _, cl in ipairs(clients) do
        if not L.wait_child(cl.pid, 15) then L.kill(cl.pid, "KILL"); L.wait_child(cl.pid, 5) end
      end
    end)
    for k = 1, 4 do
      local out = d.dir .. "/client" .. k
      clients[k] = { out = out, pid = L.fork(function()
        L.stream_client(d.listen, out, stop, 30, k)
      end, out) }
    end
    socket.sleep(0.3)

    -- gens[n] = {tag=, hup= (SIGHUP sent), stable= (every worker switched)}
    local gens = { { tag = "v1", hup = -math.huge, stable = -math.huge } }
    local nfailed = 0
    for k = 2, 9 do
      local b = L.BROKEN[(k - 2) % #L.BROKEN + 1]
      assert.are.equal(k - 1, (failed_reload(d, tail, b[2])))
      nfailed = nfailed + 1
      socket.sleep(0.1)
      local hup = L.now()
      assert.are.equal(k, reload(d, tail, L.policy("v" .. k)))
      assert(tail:wait_workers(workers, k, 10), "not every worker serves generation " .. k .. ":\n" .. d:log())
      gens[k] = { tag = "v" .. k, hup = hup, stable = L.now() }
      socket.sleep(k == 9 and 1 or 0.25) -- the last: room for new sessions on a loaded machine
    end
    L.write(stop, "")
    for _, cl in ipairs(clients) do
      local code = L.wait_child(cl.pid, 15)
      cl.done = true
      assert.are.equal(0, code, "client crashed: " .. tostring(L.read(cl.out)))
    end

    local gen_of = {}
    for n, g in ipairs(gens) do gen_of[g.tag] = n end
    local sessions, failures, observed, in_flight = {}, {}, {}, 0
    for _, cl in ipairs(clients) do
      for _, s in ipairs(L.parse_stream(L.read(cl.out))) do sessions[#sessions + 1] = s end
    end
    for _, s in ipairs(sessions) do
      local n = s.tag and gen_of[s.tag]
      if s.result ~= "ok" then
        failures[#failures + 1] = s.result
      elseif not n then
        failures[#failures + 1] = "served by an unknown script: " .. tostring(s.tag)
      else
        -- the generation is fixed between connect (t0) and OPTNEG (t1): it
        -- must have been current then
        if s.t1 < gens[n].hup or (gens[n + 1] and s.t0 > gens[n + 1].stable) then
          failures[#failures + 1] = ("%s served a session from %.3f to %.3f, outside its time"):format(
            s.tag, s.t0, s.t1)
        end
        if s.t0 >= gens[n].stable then observed[n] = true end
        for m = n + 1, #gens do
          if s.t1 < gens[m].hup and s.t2 > gens[m].hup then in_flight = in_flight + 1; break end
        end
      end
    end
    assert.are.equal(0, #failures, #failures .. " of " .. #sessions .. " sessions failed, first: " ..
      tostring(failures[1]))
    assert(#sessions >= 100, "only " .. #sessions .. " sessions ran")
    for n = 1, #gens do assert(observed[n], "no new session got generation " .. n) end
    assert(in_flight > 0, "no session was in flight across a reload")

    -- the log: one failure line per broken script, nothing else went wrong,
    -- and every connection line names the generation of the script it saw
    local errs = tail:grep(" ERROR ")
    assert.are.equal(nfailed, #errs, lines(errs))
    for _, l in ipairs(errs) do assert(l:find("reload failed", 1, true), l) end
    local tl = tag_lines(tail)
    assert.are.equal(2 * #sessions, #tl, "one TAG line per message")
    local per_conn = {}
    for _, t in ipairs(tl) do
      assert.are.equal(gens[t.gen] and gens[t.gen].tag, t.tag, t.line)
      local pc = per_conn[t.cid] or { n = 0, tag = t.tag }
      per_conn[t.cid] = pc
      pc.n = pc.n + 1
      assert.are.equal(pc.tag, t.tag, "connection " .. t.cid .. " changed script")
    end
    -- connection ids are unique across the workers: two messages each
    for cid, pc in pairs(per_conn) do assert.are.equal(2, pc.n, "c=" .. cid) end
    assert.are.same(workers, L.children(d.pid))
  end)

  it("a SIGHUP sent to a worker itself changes nothing", function()
    local tail, workers
    d, tail, workers = start(A, 2)
    L.replace(d.script_path, B)
    for _, w in ipairs(workers) do assert.are.equal(0, L.kill(w, "HUP")) end
    socket.sleep(0.3)
    assert.are.same(workers, L.children(d.pid))
    for _ = 1, 4 do assert.are.equal("A", session_tag(d.listen)) end
    assert.are.equal(0, #tail:grep("generation 2"), d:log())
    assert.are.equal(0, #tail:grep(" ERROR "), d:log())
    assert.are.equal(2, reload(d, tail, B))
    assert.are.equal("B", wait_tag(d.listen, "B"))
  end)

  it("1000 reloads leave the memory of the supervisor and the worker bounded", function()
    if os.getenv("LUAMILTER_SANITIZED") then
      -- ASan keeps freed memory in quarantine on purpose: RSS says nothing here
      pending("skipped under sanitizers: RSS growth is measured by the plain build")
      return
    end
    local extra = "package.loaded.pad = {}\n" ..
      "for i = 1, 3000 do package.loaded.pad[i] = TAG .. i .. string.rep('p', 100) end"
    local function pol(i) return L.policy("m" .. i, { extra = extra }) end
    local tail, workers
    d, tail, workers = start(pol(1), 1, { "--log-level", "info" })
    local function reloads(first, last)
      for i = first, last do
        assert.are.equal(i, reload(d, tail, pol(i)))
        if i % 100 == 0 then assert.are.equal("m" .. i, wait_tag(d.listen, "m" .. i)) end
      end
      assert.are.equal("m" .. last, wait_tag(d.listen, "m" .. last))
    end
    reloads(2, 50) -- warm-up
    local s0, w0 = L.rss_kb(d.pid), L.rss_kb(workers[1])
    local t = L.now()
    reloads(51, 1050)
    local s1, w1 = L.rss_kb(d.pid), L.rss_kb(workers[1])
    local report = ("supervisor %d -> %d kB, worker %d -> %d kB, 1000 reloads in %.1fs"):format(
      s0, s1, w0, w1, L.now() - t)
    if os.getenv("LIFECYCLE_VERBOSE") then print(report) end
    assert(s1 - s0 < 8 * 1024, report)
    assert(w1 - w0 < 8 * 1024, report)
    assert.are.same(workers, L.children(d.pid))
    assert.are.equal(0, #tail:grep(" ERROR "))
  end)

  it("the old script's state is freed when its last connection closes", function()
    if os.getenv("LUAMILTER_SANITIZED") then
      -- ASan keeps freed memory in quarantine on purpose: RSS says nothing here
      pending("skipped under sanitizers: RSS growth is measured by the plain build")
      return
    end
    local big = L.policy("A", { extra = "package.loaded.big = string.rep('x', 48 * 1048576)" })
    local tail, workers
    d, tail, workers = start(big, 1)
    local w = workers[1]
    local c = assert(d:client())
    finally(function() c:close() end)
    assert(L.open(c))
    assert.are.equal("A", assert(L.begin_message(c)))
    local s_before, w_before = L.rss_kb(d.pid), L.rss_kb(w)
    assert(w_before > 48 * 1024, "the worker does not hold the big script: " .. w_before .. " kB")

    assert.are.equal(2, reload(d, tail, B))
    assert(tail:wait_workers(workers, 2, 10), "not every worker serves generation 2:\n" .. d:log())
    assert.are.equal("B", session_tag(d.listen))
    -- the supervisor never runs the script: it never held the big string
    assert(s_before < 40 * 1024 and L.rss_kb(d.pid) < 40 * 1024,
      ("supervisor at %d kB (was %d): it holds a Lua state"):format(L.rss_kb(d.pid), s_before))
    socket.sleep(0.2)
    assert(L.rss_kb(w) > w_before - 8 * 1024, "the state was freed while a connection still uses it")

    assert.are.equal("A", assert(L.end_message(c)))
    c:quit()
    c:close()
    assert(L.wait_until(function() return L.rss_kb(w) < w_before - 40 * 1024 end, 3),
      ("worker still at %d kB (was %d) after the last connection closed"):format(L.rss_kb(w), w_before))
    assert.are.equal("B", session_tag(d.listen))
  end)
end)

describe("supervisor", function()
  local d

  after_each(function()
    if d then d:stop(); d = nil end
  end)

  it("restarts a worker killed with SIGKILL, logs the signal, and the other worker's session completes", function()
    local tail, workers
    d, tail, workers = start(A, 2)
    local c1 = assert(d:client())
    local flag = d.dir .. "/release"
    local held = {}
    finally(function()
      L.write(flag, "")
      c1:close()
      for _, c in ipairs(held) do c:close() end
    end)
    assert(L.open(c1))
    assert.are.equal("A", assert(L.begin_message(c1)))
    local r = assert(c1:rcpt("<pid@a>", {}, {}))
    local p1 = tonumber(r.text:match("pid=(%d+)$"))
    assert(set(workers)[p1], "c1 is not served by a worker")
    local p2 = workers[1] == p1 and workers[2] or workers[1]

    assert.are.equal(2, reload(d, tail, B))
    assert(tail:wait_workers(workers, 2, 10), "not every worker serves generation 2:\n" .. d:log())
    local from = #tail:poll().lines + 1
    assert.are.equal(0, L.kill(p2, "KILL"))
    local i = tail:wait("worker " .. p2 .. "[^%d]", from, 5)
    assert(i, "the death of worker " .. p2 .. " was not logged:\n" .. d:log())
    local line = tail.lines[i]
    assert(line:find("signal 9", 1, true) or line:find("KILL") or line:find("Killed"),
      "the log line does not name the signal: " .. line)

    -- c1 goes on undisturbed, on the script it started with
    assert.are.equal("A", assert(L.end_message(c1)))
    assert.are.equal("A", assert(L.message(c1)))
    c1:quit()
    c1:close()
    assert.are.equal("B", session_tag(d.listen))

    -- the replacement comes up and serves the current generation
    local now = L.wait_until(function()
      local ch = L.children(d.pid)
      if #ch == 2 and not set(ch)[p2] then return ch end
    end, 5)
    assert(now, "no replacement worker:\n" .. d:log())
    assert(set(now)[p1], "the surviving worker was replaced too")
    socket.sleep(0.2)
    local pids = {}
    from = 1
    for k = 1, 2 do
      local c = assert(d:client())
      held[k] = c
      assert(L.open(c))
      assert.are.equal("B", assert(L.begin_message(c)))
      local tag, pid, j = hold(c, tail, flag, from)
      from = j + 1
      assert.are.equal("B", tag)
      pids[#pids + 1] = pid
    end
    table.sort(pids)
    assert.are.same(now, pids)
    L.write(flag, "")
    for k = 1, 2 do
      assert.are.equal("B", (held_reply(held[k])))
      assert.are.equal("B", assert(L.end_message(held[k])))
    end
  end)
end)

describe("stop", function()
  local d

  after_each(function()
    if d then d:stop(); d = nil end
  end)

  -- bounded: true once a new connection to listen fails
  local function refused(listen, timeout)
    return L.wait_until(function()
      local c = mc.connect(listen, { timeout = 0.5 })
      if c then c:close(); return false end
      return true
    end, timeout or 3, 0.02)
  end

  for _, kind in ipairs({ "unix", "tcp" }) do
    it("SIGTERM in the middle of a session (" .. kind .. "): no new connection, the session finishes, exit 0",
        function()
      d = start(A, 2, nil, { tcp = kind == "tcp" })
      local c = assert(d:client())
      finally(function() c:close() end)
      assert(L.open(c))
      assert.are.equal("A", assert(L.begin_message(c))) -- after MAIL/RCPT
      assert(d:signal("TERM"))
      assert(refused(d.listen), "a new connection is still accepted after SIGTERM")
      if kind == "unix" then
        assert.is_false(L.exists(d.listen:sub(6)), "the socket file is still there during the shutdown")
      end
      socket.sleep(0.3)
      assert(d:alive(), "the daemon exited with a session open:\n" .. d:log())
      assert(refused(d.listen, 0.1), "a new connection was accepted during shutdown")

      assert.are.equal("A", assert(L.end_message(c)))
      assert.are.equal("A", assert(L.message(c)))
      c:quit()
      c:close()
      local code, how = d:wait(5)
      assert.are.equal("exited", how, d:log())
      assert.are.equal(0, code)
      if kind == "unix" then
        assert.is_false(L.exists(d.listen:sub(6)), "the socket file is still there")
      end
    end)
  end

  -- a daemon of n workers with a session open in the middle of a message;
  -- returns its workers and the session's client
  local function with_session(n, args)
    local _, workers
    d, _, workers = start(A, n, args)
    local c = assert(d:client())
    finally(function() c:close() end)
    assert(L.open(c))
    assert.are.equal("A", assert(L.begin_message(c)))
    return workers, c
  end

  it("a second SIGTERM exits at once even with a session open", function()
    local workers, c = with_session(2)
    assert(d:signal("TERM"))
    assert(refused(d.listen))
    assert(d:alive())
    local t = L.now()
    assert(d:signal("TERM"))
    local code, how = d:wait(2)
    assert(code, "still running 2 s after the second signal")
    assert(L.now() - t < 2)
    assert.are.equal("exited", how)
    for _, w in ipairs(workers) do
      assert(L.wait_dead(w, 2), "worker " .. w .. " outlived the supervisor:\n" .. d:log())
    end
    local _, err = c:read_frame(2)
    assert.are.equal("closed", err)
    assert.is_false(L.exists(d.listen:sub(6)), "the socket file is still there")
  end)

  -- Signals of one kind merge while pending: a worker that has not run its
  -- handler for the first SIGTERM when the second arrives sees one, and
  -- would go on finishing its session.  A stopped worker cannot act on
  -- any signal it gets: the second signal must end it all the same.
  it("a second SIGTERM ends a worker that could not act on the first", function()
    local workers, c = with_session(1)
    local w = workers[1]
    assert(L.kill(w, "STOP"))
    -- busted keeps one finally per test: this one closes c too
    finally(function() c:close(); if L.alive(w) then L.kill(w, "KILL") end end)
    assert(L.wait_until(function() return (L.stat(w) or {}).state == "T" end, 2, 0.01),
      "the worker did not stop")
    assert(d:signal("TERM"))
    assert(refused(d.listen))
    assert(d:signal("TERM"))
    local code, how = d:wait(2)
    assert(code, "still running 2 s after the second signal")
    assert.are.equal("exited", how)
    assert(L.wait_dead(w, 3), "worker " .. w .. " outlived the supervisor:\n" .. d:log())
    local _, err = c:read_frame(2)
    assert.are.equal("closed", err)
  end)

  -- a supervisor killed outright (kill -9, the OOM killer): its worker
  -- accepts nothing more, finishes the open session, then exits
  it("a worker whose supervisor died finishes its session, then exits", function()
    local workers, c = with_session(1, { "--shutdown-timeout", "20" })
    local w = workers[1]
    -- busted keeps one finally per test: this one closes c too
    finally(function() c:close(); if L.alive(w) then L.kill(w, "KILL") end end)
    local tail = L.tail(d.log_path)
    assert(d:signal("KILL"))
    assert.are.equal("killed", select(2, d:wait(2)))
    assert(tail:wait("the supervisor is gone: stopping", 1, 5, 0.01), d:log())
    assert(refused(d.listen), "a new connection is still accepted")
    assert(L.alive(w), "the worker dropped its open session:\n" .. d:log())
    assert.are.equal("A", assert(L.end_message(c)))
    c:quit()
    assert(L.wait_dead(w, 3), "the worker outlived its last session:\n" .. d:log())
  end)

  it("--shutdown-timeout bounds the wait for an idle open session, then exit 0", function()
    d = start(A, 1, { "--shutdown-timeout", "1" })
    local c = assert(d:client())
    finally(function() c:close() end)
    assert(L.open(c))
    local t = L.now()
    assert(d:signal("TERM"))
    local code, how = d:wait(5)
    local took = L.now() - t
    assert(code, "still running 5 s after SIGTERM with --shutdown-timeout 1")
    assert.are.equal("exited", how)
    assert.are.equal(0, code)
    assert(took >= 0.9, ("exited after %.2fs: the open session was not given its time"):format(took))
    assert(took <= 3, ("exited after %.2fs"):format(took))
    local _, err = c:read_frame(1)
    assert.are.equal("closed", err)
  end)

  for _, sig in ipairs({ "TERM", "INT" }) do
    it("SIG" .. sig .. " stops an idle daemon: exit 0, socket file removed", function()
      local _, workers
      d, _, workers = start(A, 2)
      assert.are.equal("A", session_tag(d.listen))
      local t = L.now()
      assert(d:signal(sig))
      local code, how = d:wait(3)
      assert(code, "still running 3 s after SIG" .. sig)
      assert(L.now() - t < 2)
      assert.are.equal("exited", how)
      assert.are.equal(0, code)
      for _, w in ipairs(workers) do assert(L.wait_dead(w, 2)) end
      assert.is_false(L.exists(d.listen:sub(6)))
    end)
  end
end)

describe("--pidfile", function()
  local d, dir

  before_each(function() dir = L.tmpdir() end)

  after_each(function()
    if d then d:stop(); d = nil end
    L.rmtree(dir)
  end)

  local function pid_in(path)
    local s = L.read(path)
    return s and tonumber(s:match("^(%d+)\n?$"))
  end

  it("holds the supervisor's pid, leaves no temporary file, and is removed at exit", function()
    local pidf = dir .. "/lm.pid"
    d = start(A, 2, { "--pidfile", pidf })
    assert(L.wait_until(function() return pid_in(pidf) end, 3), "no pidfile")
    assert.are.equal(d.pid, pid_in(pidf))
    assert.are.same({ "lm.pid" }, L.ls(dir))
    assert(d:signal("TERM"))
    assert.are.equal(0, d:wait(5))
    assert.is_false(L.exists(pidf))
  end)

  it("a second instance with the same pidfile refuses to start (exit 1, names the pidfile)", function()
    local pidf = dir .. "/lm.pid"
    d = start(A, 1, { "--pidfile", pidf })
    assert(L.wait_until(function() return pid_in(pidf) end, 3), "no pidfile")
    local script = dir .. "/s2.lua"
    L.write(script, B)
    local r = D.run({ "--workers", "1", "--pidfile", pidf, "-l", "unix:" .. dir .. "/other.sock", script }, 5)
    assert.is_falsy(r.timed_out, "the second instance kept running")
    assert.are.equal(1, r.status)
    assert(r.stderr:find(pidf, 1, true), r.stderr)
    assert.are.equal(d.pid, pid_in(pidf))
    assert.is_false(L.exists(dir .. "/other.sock"))
    assert(d:alive())
    assert.are.equal("A", session_tag(d.listen))
  end)

  it("a stale pidfile (its pid is not running) does not block the start", function()
    local pidf = dir .. "/lm.pid"
    local stale = 999999
    while L.alive(stale) or L.exists("/proc/" .. stale) do stale = stale - 1 end
    L.write(pidf, stale .. "\n")
    d = start(A, 1, { "--pidfile", pidf })
    assert(L.wait_until(function() return pid_in(pidf) == d.pid end, 3),
      "the pidfile was not rewritten: " .. tostring(L.read(pidf)))
    assert.are.equal("A", session_tag(d.listen))
  end)
end)

describe("in the foreground", function()
  local dir, p

  before_each(function() dir = L.tmpdir() end)

  after_each(function()
    if p then p:stop(); p = nil end
    L.rmtree(dir)
  end)

  -- systemctl reload or a logrotate hook can come while the daemon still
  -- loads its script: it must neither die of it nor lose it
  it("a SIGHUP during the start does not kill the supervisor: it starts, then reloads", function()
    local script, sock = dir .. "/script.lua", dir .. "/s.sock"
    -- the top level takes a second or two: the SIGHUP comes meanwhile
    L.write(script, "local t = os.time() + 2\nwhile os.time() < t do end\n" .. A)
    local err
    p, err = L.launch({ L.binary(), "--workers", "1", "--store", "lmdb:" .. dir .. "/store.mdb",
      "-l", "unix:" .. sock, script }, { log = dir .. "/stderr" })
    assert(p, err)
    -- the supervisor holds SIGHUP from main() on (SigBlk bit 0): only then
    -- is the signal a test of the start, not of the exec before it
    local held, deadline = false, L.now() + 10
    while not held and L.now() < deadline do
      local mask = (L.read("/proc/" .. p.pid .. "/status") or ""):match("SigBlk:%s*(%x+)")
      held = mask ~= nil and tonumber(mask:sub(-1), 16) % 2 == 1
      if not held then socket.sleep(0.01) end
    end
    assert.is_true(held, "SIGHUP never held:\n" .. p:log())
    assert(p:signal("HUP"))
    assert(mc.wait_socket("unix:" .. sock, 15), "not listening:\n" .. p:log())
    assert.is_true(p:alive(), p:log())
    -- the first answer can wait for three top levels of one to two
    -- seconds each (the start's check, generation 1's worker, then
    -- generation 2's when its worker takes the socket first): 3.4 to
    -- 3.9 s measured, more than the usual 5 s on a loaded machine
    assert.are.equal("A", session_tag("unix:" .. sock, 30))
    -- the signal was kept, not dropped: a reload follows the start
    deadline = L.now() + 15
    while not p:log():find("reloaded " .. script .. ": generation 2", 1, true) and L.now() < deadline do
      socket.sleep(0.05)
    end
    assert.truthy(p:log():find("reloaded " .. script .. ": generation 2", 1, true), p:log())
    assert.is_true(p:alive(), p:log())
  end)

  it("logging goes to stderr, connection lines carry the generation, nothing goes to stdout", function()
    local script, sock = dir .. "/script.lua", dir .. "/s.sock"
    L.write(script, A)
    local err
    p, err = L.launch({ L.binary(), "--workers", "1", "-l", "unix:" .. sock, script },
      { log = dir .. "/stderr", out = dir .. "/stdout", listen = "unix:" .. sock })
    assert(p, err)
    assert.are.equal("A", session_tag("unix:" .. sock))
    L.replace(script, B)
    assert(p:signal("HUP"))
    assert.are.equal("B", wait_tag("unix:" .. sock, "B"))
    assert(p:signal("TERM"))
    assert.are.equal(0, p:wait(5))
    local log = p:log()
    assert(log:find("reloaded " .. script .. ": generation 2", 1, true), log)
    assert(log:find("%[c=%d+ g=1[ %]][^\n]*closed after"), log)
    assert(log:find("%[c=%d+ g=2[ %]][^\n]*closed after"), log)
    assert.are.equal("", L.read(dir .. "/stdout"))
  end)
end)

describe("--daemon", function()
  local dir, daemon_pid
  local extra_files = {}

  before_each(function()
    dir = L.tmpdir()
    daemon_pid = nil
  end)

  after_each(function()
    if daemon_pid and L.alive(daemon_pid) then
      local ch = L.children(daemon_pid)
      L.kill(daemon_pid, "TERM")
      if not L.wait_dead(daemon_pid, 5) then
        L.kill(daemon_pid, "KILL")
        for _, w in ipairs(ch) do L.kill(w, "KILL") end
      end
    end
    for _, f in ipairs(extra_files) do os.remove(f) end
    L.rmtree(dir)
  end)

  -- runs the launching command; returns status, stdout, stderr, pid, seconds
  local function launch(args, cwd)
    local argv = { abs(L.binary()) }
    for _, a in ipairs(args) do argv[#argv + 1] = a end
    local t = L.now()
    local pid = assert(L.spawn(argv, dir .. "/out", dir .. "/err", cwd))
    local code = L.wait_child(pid, 10)
    if not code then L.kill(pid, "KILL"); L.wait_child(pid, 5) end
    local took = L.now() - t
    local out, err = L.read(dir .. "/out") or "", L.read(dir .. "/err") or ""
    os.remove(dir .. "/out")
    os.remove(dir .. "/err")
    return code, out, err, pid, took
  end

  local function pid_in(path)
    local s = L.read(path)
    return s and tonumber(s:match("^(%d+)\n?$"))
  end

  it("detaches: the command returns 0 at once, the pidfile names the detached supervisor, " ..
      "which serves, reloads and stops via the pidfile", function()
    local script, pidf, sock = dir .. "/script.lua", dir .. "/lm.pid", dir .. "/s.sock"
    L.write(script, A)
    local code, out, err, child, took = launch({ "--daemon", "--workers", "2", "--pidfile", pidf,
      "-l", "unix:" .. sock, script })
    daemon_pid = pid_in(pidf)
    assert.are.equal(0, code, err)
    assert(took < 3, "the command took " .. took .. " s")
    assert.are.equal("", out .. err)
    assert(daemon_pid, "no pidfile when the command returned")
    assert.are_not.equal(child, daemon_pid)
    assert(L.alive(daemon_pid), "the pidfile names no live process")
    local st, me = L.stat(daemon_pid), L.stat(unistd.getpid())
    assert.are_not.equal(me.sid, st.sid, "still in the caller's session")
    assert.are_not.equal(unistd.getpid(), st.ppid)
    for fd = 0, 2 do
      assert.are.equal("/dev/null", L.readlink("/proc/" .. daemon_pid .. "/fd/" .. fd))
    end
    local workers = assert(L.wait_children(daemon_pid, 2, 5), "no workers")

    assert.are.equal("A", session_tag("unix:" .. sock))
    L.replace(script, B)
    assert.are.equal(0, L.kill(daemon_pid, "HUP"))
    assert.are.equal("B", wait_tag("unix:" .. sock, "B"))

    assert.are.equal(0, L.kill(pid_in(pidf), "TERM"))
    assert(L.wait_dead(daemon_pid, 5), "still running after SIGTERM")
    for _, w in ipairs(workers) do assert(L.wait_dead(w, 2)) end
    assert.are.same({ "script.lua" }, L.ls(dir))
  end)

  it("a broken script: the command exits 1 with file:line on stderr and leaves nothing behind", function()
    local script, pidf, sock = dir .. "/script.lua", dir .. "/lm.pid", dir .. "/s.sock"
    L.write(script, L.BROKEN[1][2])
    local code, _, err = launch({ "--daemon", "--workers", "1", "--pidfile", pidf, "-l", "unix:" .. sock,
      script })
    daemon_pid = pid_in(pidf)
    assert.are.equal(1, code)
    assert(err:find(script .. L.BROKEN[1][3], 1, true), err)
    assert.are.same({ "script.lua" }, L.ls(dir))
  end)

  it("relative script, socket and pidfile paths mean the directory it was started in", function()
    local name = "lm-" .. dir:match("([^/]+)$") .. ".pid" -- unique, in case it lands in /
    extra_files = { "/" .. name, "/s.sock" }
    assert.is_false(L.exists("/" .. name))
    L.write(dir .. "/script.lua", A)
    local code, _, err = launch({ "--daemon", "--workers", "1", "--pidfile", name, "-l", "unix:s.sock",
      "script.lua" }, dir)
    daemon_pid = pid_in(dir .. "/" .. name) or pid_in("/" .. name)
    assert.are.equal(0, code, err)
    assert.are.equal(daemon_pid, pid_in(dir .. "/" .. name), "the pidfile is not in the start directory")
    assert.are.equal("A", session_tag("unix:" .. dir .. "/s.sock"))
    L.replace(dir .. "/script.lua", B)
    assert.are.equal(0, L.kill(daemon_pid, "HUP"))
    assert.are.equal("B", wait_tag("unix:" .. dir .. "/s.sock", "B"))
    assert.are.equal(0, L.kill(daemon_pid, "TERM"))
    assert(L.wait_dead(daemon_pid, 5))
    assert.are.same({ "script.lua" }, L.ls(dir))
  end)

  local root = unistd.geteuid() == 0
  local devlog_free = not L.exists("/dev/log")
  if root and devlog_free then
    it("logs to syslog (facility mail) once detached, nothing to stderr", function()
      local unix = require "socket.unix"
      local log = assert(unix.dgram())
      assert(log:bind("/dev/log"))
      finally(function() log:close(); os.remove("/dev/log") end)
      log:settimeout(0)
      local msgs = {}
      local function wait_msg(pattern)
        return L.wait_until(function()
          while true do
            local m = log:receive()
            if not m then break end
            msgs[#msgs + 1] = m
          end
          for _, m in ipairs(msgs) do
            if m:find(pattern) then return m end
          end
        end, 5)
      end
      local script, pidf, sock = dir .. "/script.lua", dir .. "/lm.pid", dir .. "/s.sock"
      L.write(script, A)
      local code, out, err = launch({ "--daemon", "--workers", "1", "--pidfile", pidf, "-l", "unix:" .. sock,
        script })
      daemon_pid = pid_in(pidf)
      assert.are.equal(0, code, err)
      assert.are.equal("", out .. err)
      assert.are.equal("A", session_tag("unix:" .. sock))
      L.replace(script, L.BROKEN[1][2])
      L.kill(daemon_pid, "HUP")
      local m = wait_msg("reload failed")
      assert(m, "no 'reload failed' in syslog:\n" .. lines(msgs))
      assert(m:find("^<19>"), "not mail.err: " .. m)
      assert(m:find("luamilter[" .. daemon_pid .. "]", 1, true), m)
      assert(m:find(script .. L.BROKEN[1][3], 1, true), m)
      L.replace(script, B)
      L.kill(daemon_pid, "HUP")
      m = wait_msg("generation 2")
      assert(m, "no reload line in syslog:\n" .. lines(msgs))
      assert(m:find("^<22>"), "not mail.info: " .. m)
      assert.are.equal("B", wait_tag("unix:" .. sock, "B"))
      assert(wait_msg(" g=2[ %]].*closed after"), "no connection line in syslog:\n" .. lines(msgs))
      L.kill(daemon_pid, "TERM")
      assert(L.wait_dead(daemon_pid, 5))
    end)
  else
    it("logs to syslog once detached", function()
      local why = root and "/dev/log exists (a real syslog daemon owns it)" or "not running as root"
      print("lifecycle_spec: syslog test skipped: " .. why)
      pending("needs root and a free /dev/log: " .. why)
    end)
  end
end)

describe("--user/--group", function()
  local root = unistd.geteuid() == 0
  local pw, gr = pwd.getpwnam("nobody"), grp.getgrnam("nogroup")
  if not (root and pw and gr) then
    local why = not root and "not running as root" or "no user nobody / group nogroup"
    it("drop privileges after binding", function()
      print("lifecycle_spec: privilege drop tests skipped: " .. why)
      pending(why)
    end)
    return
  end

  local dir, p

  before_each(function()
    dir = L.tmpdir()
    assert(pstat.chmod(dir, 493)) -- 0755: nobody reads the script
  end)

  after_each(function()
    if p then p:stop(); p = nil end
    L.rmtree(dir)
  end)

  local function ids_of(pid)
    local st = assert(L.status(pid), "no process " .. pid)
    return st.Uid, st.Gid, st.Groups
  end

  local function expect_nobody(pid)
    local uid, gid, groups = ids_of(pid)
    local want_u = ("%d\t%d\t%d\t%d"):format(pw.pw_uid, pw.pw_uid, pw.pw_uid, pw.pw_uid)
    local want_g = ("%d\t%d\t%d\t%d"):format(gr.gr_gid, gr.gr_gid, gr.gr_gid, gr.gr_gid)
    assert.are.equal(want_u, uid, "Uid of " .. pid)
    assert.are.equal(want_g, gid, "Gid of " .. pid)
    for g in (groups or ""):gmatch("%d+") do
      assert.are_not.equal("0", g, "process " .. pid .. " kept group root")
    end
  end

  it("the socket belongs to the run-time user and group with --socket-mode; every process runs as them", function()
    local run = dir .. "/run" -- the socket's directory, owned by the run-time user
    assert(pstat.mkdir(run, 493))
    assert(unistd.chown(run, pw.pw_uid, gr.gr_gid))
    local script, sock, pidf = dir .. "/script.lua", run .. "/s.sock", run .. "/lm.pid"
    L.write(script, A)
    local err
    p, err = L.launch({ abs(L.binary()), "--user", "nobody", "--group", "nogroup", "--socket-mode", "0660",
      "--workers", "2", "--pidfile", pidf, "-l", "unix:" .. sock, script },
      { log = dir .. "/daemon.log", listen = "unix:" .. sock })
    assert(p, err)
    local st = assert(pstat.stat(sock))
    assert.are.equal(pw.pw_uid, st.st_uid)
    assert.are.equal(gr.gr_gid, st.st_gid)
    assert.are.equal("660", ("%o"):format(st.st_mode % 512))
    local workers = assert(L.wait_workers(p.pid, 2, p.log_path, 5), "no workers:\n" .. p:log())
    expect_nobody(p.pid)
    for _, w in ipairs(workers) do expect_nobody(w) end

    assert.are.equal("A", session_tag("unix:" .. sock))
    -- an MTA user in the socket's group may connect, another may not
    assert(L.connect_as(sock, 4242, gr.gr_gid))
    assert.is_false((L.connect_as(sock, 4242, 4242)))

    L.replace(script, B)
    assert(p:signal("HUP"))
    assert.are.equal("B", wait_tag("unix:" .. sock, "B"))

    assert(p:signal("TERM"))
    assert.are.equal(0, p:wait(5), p:log())
    assert.is_false(L.exists(sock), "the socket file is still there")
    assert.is_false(L.exists(pidf), "the pidfile is still there")
  end)

  it("binds a privileged TCP port before dropping root", function()
    local port
    for candidate = 1023, 600, -1 do
      local s = socket.tcp()
      if s:bind("127.0.0.1", candidate) then s:close(); port = candidate; break end
      s:close()
    end
    assert(port, "no free port below 1024")
    local script = dir .. "/script.lua"
    L.write(script, A)
    local listen = "inet:" .. port .. "@127.0.0.1"
    local err
    p, err = L.launch({ abs(L.binary()), "--user", "nobody", "--group", "nogroup", "--workers", "1",
      "-l", listen, script }, { log = dir .. "/daemon.log", listen = listen })
    assert(p, err)
    local workers = assert(L.wait_workers(p.pid, 1, p.log_path, 5))
    expect_nobody(p.pid)
    expect_nobody(workers[1])
    assert.are.equal("A", session_tag(listen))
    assert(p:signal("TERM"))
    assert.are.equal(0, p:wait(5), p:log())
  end)
end)
