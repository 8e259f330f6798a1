-- luacheck: std +busted
-- milter.store against the real binary, one suite run once per backend:
-- --store lmdb:<a temp path>, and --store redis://<a real redis-server on
-- loopback>/1. get/set/del/incr with and without a ttl, values come back
-- with the type they were stored with, expiry for every worker, incr
-- atomic across 4 workers while the script is reloaded, values kept across
-- a reload and a restart, misuse, and `luamilter test` on the same store.
-- Then what only one backend has: a full map, the sweep and an unusable
-- path (LMDB); a unix socket, values other Redis clients read, and Redis
-- stopped mid-run (Redis).
package.path = "./?.lua;" .. package.path
local U = require "spec.daemon.util"
local L = require "spec.daemon.lifecycle_util"
local S = require "spec.support.servers"
local socket = require "socket"
local stdlib = require "posix.stdlib"

local D = U.D

-- a session whose envelope sender is `op` ("<set>", "<get>"...): the
-- scripts below branch on it; returns the MAIL reply
local function op(d, sender)
  local c = U.client(d)
  U.open(c)
  local res = U.message(c, { mail = sender })
  c:quit()
  c:close()
  return res.mail
end

for _, backend in ipairs { "lmdb", "redis" } do
describe("milter.store (" .. backend .. ")", function()
  local d, dir, store, redis
  setup(function()
    if backend == "redis" then redis = S.redis() end
  end)
  teardown(function()
    if redis then redis:stop() end
  end)
  before_each(function()
    dir = assert(stdlib.mkdtemp("/tmp/luamilter-store-XXXXXX"))
    store = dir .. "/store.mdb"
    if redis then assert.are.equal("OK", redis:cmd("FLUSHALL")) end
  end)
  after_each(function()
    if d then d:stop(); d = nil end
    D.rmtree(dir)
  end)

  -- the --store argument of this run
  local function spec()
    return redis and redis.url .. "/1" or "lmdb:" .. store
  end

  local function start(body, args)
    local a = { "--store", spec() }
    for _, x in ipairs(args or {}) do a[#a + 1] = x end
    d = U.start(U.script("local store = milter.store\n" .. body), { args = a })
    return d
  end

  it("get, set, del, incr: values come back as stored (strings stay strings), binary-safe", function()
    start [[
function H.envfrom(ctx)
  seen(ctx, "absent", { store:get("nothing") })
  seen(ctx, "set", { store:set("s", "1"), store:set("n", 1), store:set("f", 0.25) })
  local s, n, f = store:get("s"), store:get("n"), store:get("f")
  seen(ctx, "types", { type(s), s, type(n), n, type(f), f })
  seen(ctx, "bin", { store:set("b\0k", "a\0b\r\nc"), store:get("b\0k") })
  seen(ctx, "empty", { store:set("e", ""), store:get("e") })
  seen(ctx, "incr", { store:incr("c", 1), store:incr("c", 41), store:incr("c", -0.5), store:incr("c") })
  seen(ctx, "incrstr", { store:incr("s", 2), type(store:get("s")) })
  store:set("word", "abc")
  seen(ctx, "incrword", { store:incr("word", 1) })
  seen(ctx, "replace", { store:set("n", "now a string"), store:get("n") })
  seen(ctx, "del", { store:del("n"), store:get("n"), store:del("n") })
  local big = string.rep("x", 100000)
  seen(ctx, "big", { store:set("big", big), store:get("big") == big })
  local k = string.rep("k", 511)
  seen(ctx, "maxkey", { store:set(k, 5), store:get(k) })
  seen(ctx, "tostring", { tostring(store) })
end
return H
]]
    assert.are.equal("c", op(d, "<x@example.org>").cmd)
    assert.are.same({ {} }, U.seen(d, "absent"))
    assert.are.same({ { true, true, true } }, U.seen(d, "set"))
    assert.are.same({ { "string", "1", "number", 1, "number", 0.25 } }, U.seen(d, "types"))
    assert.are.same({ { true, "a\0b\r\nc" } }, U.seen(d, "bin"))
    assert.are.same({ { true, "" } }, U.seen(d, "empty"))
    assert.are.same({ { 1, 42, 41.5, 42.5 } }, U.seen(d, "incr"))
    assert.are.same({ { 3, "number" } }, U.seen(d, "incrstr"))
    assert.are.same({ { nil, "not a number" } }, U.seen(d, "incrword"))
    assert.are.same({ { true, "now a string" } }, U.seen(d, "replace"))
    assert.are.same({ { true, nil, true } }, U.seen(d, "del"))
    assert.are.same({ { true, true } }, U.seen(d, "big"))
    assert.are.same({ { true, 5 } }, U.seen(d, "maxkey"))
    assert.are.same({ { "milter.store" } }, U.seen(d, "tostring"))
    assert.are.equal(0, U.count(d:log(), "ERROR"), d:log())
  end)

  it("a ttl: the key is there right after, gone for every reader once it ran out; " ..
      "incr sets it only when it creates the key", function()
    start([[
function H.envfrom(ctx, from)
  if from == "<set>" then
    seen(ctx, "set", { store:set("t", "v", 1), store:get("t"), store:incr("c", 1, 1), store:incr("c", 1, 1000),
                       store:set("long", "v", 1000), store:set("frac", 1, 0.2) })
  else
    seen(ctx, "poll", { store:get("t"), store:get("c"), store:get("long"), store:get("frac") })
  end
end
return H
]], { "--workers", "2" })
    local t0 = socket.gettime()
    assert.are.equal("c", op(d, "<set>").cmd)
    local set = U.seen(d, "set")[1]
    assert.are.same({ true, "v", 1, 2, true, true }, set)
    -- right after, for another reader: a key with time left is there.
    -- (The 1 s keys may be gone already on a slow machine, so they are
    -- not asked for here; `set` has them as read right after writing.)
    assert.are.equal("c", op(d, "<poll>").cmd)
    assert.are.equal("v", U.seen(d, "poll")[1][3])
    -- gone after a second (fractions round up: "frac" lives 1 s too);
    -- poll with a generous bound, from both workers
    local gone
    local deadline = t0 + 15
    repeat
      socket.sleep(0.2)
      op(d, "<poll>")
      local p = U.seen(d, "poll")
      gone = p[#p]
    until (gone[1] == nil and gone[2] == nil and gone[4] == nil) or socket.gettime() > deadline
    assert.are.same({ [3] = "v" }, gone)
    assert.is_true(socket.gettime() - t0 >= 1, "expired before its second")
    -- every later reader sees it gone
    for _ = 1, 4 do op(d, "<poll>") end
    local p = U.seen(d, "poll")
    for i = #p - 3, #p do assert.are.same({ [3] = "v" }, p[i]) end
  end)

  it("incr on a counter that ran out (unread since) starts again from 0 and takes the new ttl", function()
    start [[
function H.envfrom(ctx, from)
  if from == "<a>" then seen(ctx, "a", { store:incr("c", 5, 1), store:incr("s", 1, 1) })
  elseif from == "<b>" then seen(ctx, "b", { store:incr("c", 1, 1000), store:incr("c", 1), store:incr("s", 2) })
  else seen(ctx, "c", { store:get("c"), store:get("s") }) end
end
return H
]]
    assert.are.equal("c", op(d, "<a>").cmd)
    assert.are.same({ { 5, 1 } }, U.seen(d, "a"))
    socket.sleep(1.3) -- past both expiries; nothing reads the keys meanwhile
    assert.are.equal("c", op(d, "<b>").cmd)
    assert.are.same({ { 1, 2, 2 } }, U.seen(d, "b"))
    socket.sleep(1.3) -- "c" now lives 1000 s; "s" got no ttl this time
    assert.are.equal("c", op(d, "<c>").cmd)
    assert.are.same({ { 2, 2 } }, U.seen(d, "c"))
  end)

  it("incr is atomic across 4 workers and reloads: 16 clients x 50 messages end at exactly 800", function()
    local COUNT = [[
function H.envfrom(ctx, from)
  if from == "<count>" then
    local n, err = store:incr("hits", 1, 3600)
    if not n then error("incr failed: " .. tostring(err)) end
  else
    seen(ctx, "total", { store:get("hits") })
  end
end
return H
]]
    start(COUNT, { "--workers", "4" })
    local kids = {}
    for k = 1, 16 do
      local out = dir .. "/client" .. k
      -- a new connection every 10 messages: both generations count
      kids[k] = { out = out, pid = L.fork(function()
        for _ = 1, 5 do
          local c = U.client(d)
          U.open(c)
          for _ = 1, 10 do
            local res = U.message(c, { mail = "<count>" })
            if type(res.mail) ~= "table" or res.mail.cmd ~= "c" then
              error("mail reply: " .. tostring(type(res.mail) == "table" and res.mail.cmd or res.mail))
            end
          end
          c:quit()
          c:close()
        end
      end, out) }
    end
    -- reloads while the clients count (each may come before, during or
    -- after the counting: the total must not depend on it)
    for g = 2, 4 do
      d:rewrite_script(U.script("local store = milter.store\n-- generation " .. g .. "\n" .. COUNT))
      assert(d:signal("HUP"))
      socket.sleep(0.1)
    end
    for _, kid in ipairs(kids) do
      local code = L.wait_child(kid.pid, 60)
      if not code then L.kill(kid.pid, "KILL"); L.wait_child(kid.pid, 5) end
      assert.are.equal(0, code, "client failed: " .. tostring(L.exists(kid.out) and L.read(kid.out)))
    end
    U.wait_log(d, "generation 2", 10)
    assert.is_truthy(d:log():find("generation 2", 1, true), d:log())
    op(d, "<total>")
    assert.are.same({ { 800 } }, U.seen(d, "total"))
    assert.are.equal(0, U.count(d:log(), "ERROR"), d:log())
  end)

  local KEEP = [[
function H.envfrom(ctx, from)
  if from == "<set>" then
    seen(ctx, "set", { store:set("kept", "yes"), store:incr("n", 5), store:set("ttl", "t", 3600) })
  else
    seen(ctx, "get", { store:get("kept"), store:get("n"), store:get("ttl") })
  end
end
return H
]]

  it("values are kept across a reload (SIGHUP) and a restart on the same path", function()
    start(KEEP, { "--workers", "2" })
    op(d, "<set>")
    assert.are.same({ { true, 5, true } }, U.seen(d, "set"))
    d:rewrite_script(U.script("local store = milter.store\n-- generation 2\n" .. KEEP))
    assert(d:signal("HUP"))
    U.wait_log(d, "generation 2", 10)
    assert.is_truthy(d:log():find("generation 2", 1, true), d:log())
    socket.sleep(0.3) -- both workers switched (each serves either way)
    op(d, "<get>")
    assert.are.same({ "yes", 5, "t" }, U.seen(d, "get")[1])
    assert.are.equal(0, (d:stop()))
    d = nil
    start(KEEP)
    op(d, "<get>")
    assert.are.same({ { "yes", 5, "t" } }, U.seen(d, "get"))
  end)

  it("misuse raises: outside a handler, bad keys, values and ttls, a call without ':'", function()
    start [[
local function try(f, ...)
  local ok, err = pcall(f, ...)
  return ok and "no error" or tostring(err):gsub("^.-:%d+: ", "")
end
function H.envfrom(ctx)
  seen(ctx, "m", {
    try(store.get, store, string.rep("k", 512)),
    try(store.get, store, ""),
    try(store.get, store, 42),
    try(store.set, store, "k", nil),
    try(store.set, store, "k", { 1 }),
    try(store.set, store, "k", true),
    try(store.set, store, "k", 0/0),
    try(store.set, store, "k", "v", 0),
    try(store.set, store, "k", "v", -1),
    try(store.set, store, "k", "v", "60"),
    try(store.incr, store, "k", "1"),
    try(store.get, "k"),
    try(store.del),
    try(store.incr, store, "k", 0/0),
    try(store.incr, store, "k", 1, 0),
    try(store.incr, store, ""),
    try(store.incr, "k"),
  })
end
return H
]]
    op(d, "<x@example.org>")
    local m = U.seen(d, "m")[1]
    assert.are.equal(17, #m)
    for i, want in ipairs { "key must be 1 to 511 bytes", "key must be 1 to 511 bytes",
        "key must be a string", "value must be a string or a number", "value must be a string or a number",
        "value must be a string or a number", "value must be a finite number",
        "ttl must be a number of seconds > 0", "ttl must be a number of seconds > 0",
        "ttl must be a number of seconds", "increment must be a finite number",
        "milter.store expected", "milter.store expected", "increment must be a finite number",
        "ttl must be a number of seconds > 0", "key must be 1 to 511 bytes", "milter.store expected" } do
      assert.is_truthy(m[i]:find(want, 1, true), i .. ": " .. m[i])
    end
    -- at the top level (load time): the script fails to load
    local path = dir .. "/top.lua"
    D.write_file(path, 'local milter = require "milter"\nmilter.store:set("x", 1)\nreturn {}\n')
    local r = D.run({ "--store", spec(), "check", path }, 10)
    assert.are.equal(1, r.status)
    assert.is_truthy(r.stderr:find("milter.store:set: only inside a handler", 1, true), r.stderr)
  end)

  it("a misused call is reported at the script's line, naming the method", function()
    local body = [[
function H.envfrom(ctx)
  local n = store:incr("k", 1, -5) -- BAD INCR
  return milter.accept{}
end
return H
]]
    start(body, { "--on-error", "tempfail" })
    local r = op(d, "<x@example.org>")
    assert.is_truthy(r.cmd == "t" or (r.cmd == "y" and r.text:match("^4")), r.cmd .. " " .. tostring(r.text))
    local line = U.line_of(U.script("local store = milter.store\n" .. body), "BAD INCR")
    local log = U.wait_log(d, "bad argument", 5)
    local want = ":" .. line .. ": bad argument #3 to 'incr' (ttl must be a number of seconds > 0)"
    assert.is_truthy(log:find(want, 1, true), log)
  end)

  it("luamilter test uses the same store: a run sees what the previous run stored", function()
    local script, eml = dir .. "/t.lua", dir .. "/m.eml"
    D.write_file(script, [[
local milter = require "milter"
return { envfrom = function() milter.log("info", "RUN " .. milter.store:incr("runs", 1)) end }
]])
    D.write_file(eml, "From: <a@example.org>\nTo: <b@example.org>\nSubject: s\n\nbody\n")
    for i = 1, 3 do
      local r = D.run({ "--store", spec(), "test", script, eml }, 10)
      assert.are.equal(0, r.status, r.stderr)
      assert.is_truthy((r.stderr .. r.stdout):find("RUN " .. i, 1, true), r.stderr .. r.stdout)
    end
    -- and the daemon on that path sees it too
    start [[
function H.envfrom(ctx) seen(ctx, "runs", { store:get("runs") }) end
return H
]]
    op(d, "<x@example.org>")
    assert.are.same({ { 3 } }, U.seen(d, "runs"))
  end)

  if backend == "lmdb" then
    it("a directory path holds data.mdb and lock.mdb", function()
      store = dir .. "/st/"
      start(KEEP)
      op(d, "<set>")
      assert.are.same({ { true, 5, true } }, U.seen(d, "set"))
      assert.is_true(L.exists(dir .. "/st/data.mdb"))
      assert.is_true(L.exists(dir .. "/st/lock.mdb"))
    end)

    -- fills the map with 4000-byte values at <fill>, reads back at <after>
    local FILL = [[
  function H.envfrom(ctx, from)
    if from == "<fill>" then
      store:set("small", "s")
      local chunk = string.rep("z", 4000)
      for i = 1, 1000 do
        local ok, err = store:set("k" .. i, chunk)
        if not ok then seen(ctx, "full", { i > 1, err }); break end
      end
      seen(ctx, "incr", { store:incr("brandnew" .. string.rep("q", 400), 1) ~= 0 })
    else
      seen(ctx, "after", { store:get("small"), #store:get("k1") })
    end
  end
  return H
  ]]
    -- FILL's run: "store full" once the map is, and the worker goes on
    local function fills_up()
      assert.are.equal("c", op(d, "<fill>").cmd)
      assert.are.same({ { true, "store full" } }, U.seen(d, "full"))
      assert.are.equal("c", op(d, "<after>").cmd)
      assert.are.same({ { "s", 4000 } }, U.seen(d, "after"))
      assert.is_true(d:alive())
    end

    it("a full map is nil, \"store full\"; the worker keeps serving and reading", function()
      start(FILL, { "--store-map-size", "65536" })
      fills_up()
    end)

    -- A tmpfs of `size` at dir/small for body(small); unmounted after it,
    -- whatever happens. Pending where this host forbids mounting (not root).
    local function on_small_disk(size, body)
      local small = dir .. "/small"
      assert(os.execute("mkdir " .. small) == 0)
      if os.execute("mount -t tmpfs -o size=" .. size .. " tmpfs " .. small .. " 2>/dev/null") ~= 0 then
        return pending("this host cannot mount a tmpfs (the test needs root)")
      end
      local ok, err = pcall(body, small)
      if d then d:stop(); d = nil end
      os.execute("umount " .. small)
      assert(ok, err)
    end

    it("the map's blocks are taken at start: a disk that fills up later is \"store full\", not a crash", function()
      on_small_disk("2m", function(small)
        store = small .. "/store.mdb"
        start(FILL, { "--store-map-size", "1048576" })
        -- the socket listens before the start-up check has opened the store
        assert.truthy(U.wait_log(d, "luamilter serving", 10):find("luamilter serving", 1, true), d:log())
        local stat = require("posix.sys.stat").stat
        local st, lock = stat(store), stat(store .. "-lock")
        assert.is_true(st.st_blocks * 512 >= 1048576, "allocated: " .. st.st_blocks * 512)
        -- the lock file (LMDB's reader table, a shared map too) alike
        assert.is_true(lock.st_size > 0 and lock.st_blocks * 512 >= lock.st_size,
          ("lock file: %d of %d bytes"):format(lock.st_blocks * 512, lock.st_size))
        -- someone else takes the rest of the disk
        os.execute("dd if=/dev/zero of=" .. small .. "/hog bs=64k count=64 2>/dev/null")
        fills_up()
      end)
    end)

    it("a disk too small for the map fails the start with exit 1, naming the size", function()
      on_small_disk("1m", function(small)
        D.write_file(dir .. "/s.lua", "return {}\n")
        local r = D.run({ "--store", "lmdb:" .. small .. "/store.mdb", "-l", "unix:" .. dir .. "/m.sock",
          "--workers", "1", dir .. "/s.lua" }, 10)
        assert.are.equal(1, r.status, r.stderr)
        assert.is_truthy(r.stderr:find("cannot open the store at " .. small .. "/store.mdb: cannot reserve the " ..
          "map's 67108864 bytes on disk (--store-map-size): no space left on device", 1, true), r.stderr)
        assert.is_false(L.exists(dir .. "/m.sock"))
      end)
    end)

    -- the sweep's work follows the keys added (the file grows only by
    -- them): 640 new keys, 20 sweeps of 64 entries, cover the 940 entries
    -- however the cursor wraps; rewriting one counter sweeps nothing
    it("expired keys nobody reads again are swept out of the file by later new keys", function()
      start [[
  function H.envfrom(ctx, from)
    if from == "<fill>" then
      for i = 1, 300 do store:set("old" .. i, "v", 1) end
    elseif from == "<count>" then
      for _ = 1, 640 do store:incr("live", 1) end
    else
      for i = 1, 640 do store:set("new" .. i, i) end
    end
  end
  return H
  ]]
      local function entries()
        local f = assert(io.popen("mdb_stat -n " .. store .. " 2>&1"))
        local out = f:read("*a")
        f:close()
        return tonumber(out:match("Entries: (%d+)")), out
      end
      op(d, "<fill>")
      assert.are.equal(300, (entries()))
      socket.sleep(1.2)
      op(d, "<count>")
      local n, out = entries()
      assert.are.equal(301, n, out) -- "live" added, nothing swept yet
      op(d, "<write>")
      n, out = entries()
      assert.are.equal(641, n, out)
    end)

    it("with no --store: $XDG_STATE_HOME, then ~/.local/state, then /tmp/luamilter-UID (a user's own)", function()
      -- as an unprivileged user (nobody when the suite runs as root): the
      -- root default, /var/lib/luamilter, is the machine's to keep
      local unistd = require "posix.unistd"
      local root = unistd.geteuid() == 0
      local uid = root and 65534 or unistd.geteuid()
      assert(os.execute("chmod 0777 " .. dir) == 0)
      local script, eml = dir .. "/t.lua", dir .. "/m.eml"
      D.write_file(script, [[
local milter = require "milter"
return { envfrom = function() milter.log("info", "RUN " .. milter.store:incr("runs", 1)) end }
]])
      D.write_file(eml, "From: <a@example.org>\nTo: <b@example.org>\nSubject: s\n\nbody\n")
      -- a copy the user can reach (the checkout may sit in a 0700 dir)
      local bin = dir .. "/luamilter"
      D.write_file(bin, D.read_file(os.getenv("LUAMILTER_BIN") or "./build/luamilter"))
      assert(os.execute("chmod 0755 " .. bin) == 0)
      local function run(env)
        local argv = root and { "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "env", "-i" }
          or { "env", "-i" }
        for k, v in pairs(env) do argv[#argv + 1] = k .. "=" .. v end
        argv[#argv + 1] = bin
        for _, a in ipairs { "test", script, eml } do argv[#argv + 1] = a end
        local pid = assert(D.spawn(argv, dir .. "/out", dir .. "/out"))
        local code = D.wait_pid(pid, 20)
        local out = D.read_file(dir .. "/out")
        os.remove(dir .. "/out")
        return code, out
      end
      local home = dir .. "/home"
      assert(os.execute("mkdir -m 0777 " .. home) == 0)
      local code, out = run { HOME = home, XDG_STATE_HOME = dir .. "/xdg" }
      assert.are.equal(0, code, out)
      assert.truthy(out:find("RUN 1", 1, true), out)
      assert.is_true(L.exists(dir .. "/xdg/luamilter/store.mdb"), out)
      code, out = run { HOME = home, XDG_STATE_HOME = dir .. "/xdg" }
      assert.are.equal(0, code, out)
      assert.truthy(out:find("RUN 2", 1, true), out) -- the same store, the next run
      code, out = run { HOME = home }
      assert.are.equal(0, code, out)
      assert.truthy(out:find("RUN 1", 1, true), out)
      assert.is_true(L.exists(home .. "/.local/state/luamilter/store.mdb"), out)
      -- no usable HOME: a directory of the user's own under /tmp
      local tmpdir = "/tmp/luamilter-" .. uid
      local existed = L.exists(tmpdir)
      code, out = run { HOME = "/nonexistent" }
      assert.are.equal(0, code, out)
      assert.truthy(out:find("RUN", 1, true), out)
      assert.is_true(L.exists(tmpdir .. "/store.mdb"), out)
      if not existed then D.rmtree(tmpdir) end
    end)

    it("an unusable path fails the start with exit 1 and a clear message", function()
      D.write_file(dir .. "/file", "")
      D.write_file(dir .. "/s.lua", "return {}\n")
      local r = D.run({ "--store", "lmdb:" .. dir .. "/file/store.mdb", "-l", "unix:" .. dir .. "/m.sock",
        "--workers", "1", dir .. "/s.lua" }, 10)
      assert.are.equal(1, r.status)
      assert.is_truthy(r.stderr:find("cannot open the store at " .. dir .. "/file/store.mdb: ", 1, true), r.stderr)
      assert.is_truthy(r.stderr:find("not a directory", 1, true), r.stderr)
      assert.is_false(L.exists(dir .. "/m.sock"))
      -- a bad spec, a bad size: usage errors
      r = D.run({ "--store", "/x", dir .. "/s.lua" }, 10)
      assert.are.equal(2, r.status)
      r = D.run({ "--store-map-size", "100", dir .. "/s.lua" }, 10)
      assert.are.equal(2, r.status)
    end)
  end

  if backend == "redis" then
    it("on Redis, values read naturally by other clients; a unix socket URL works", function()
      local KINDS = [[
function H.envfrom(ctx, from)
  if from == "<set>" then
    seen(ctx, "set", { store:set("n", 42), store:set("f", 0.1), store:set("s", "hello"),
      store:set("sn", "42"), store:set("m", "\1x"), store:set("t", "v", 100), store:incr("c", 2.5, 100) })
  else
    local n, f, s, sn, m = store:get("n"), store:get("f"), store:get("s"), store:get("sn"), store:get("m")
    seen(ctx, "get", { n, f, s, sn, type(sn), m, store:get("byother"), store:get("c") })
  end
end
return H
]]
      start(KINDS, { "--store", "unix:" .. redis.sock .. "?db=2" })
      assert.are.equal("c", op(d, "<set>").cmd)
      assert.are.same({ { true, true, true, true, true, true, 2.5 } }, U.seen(d, "set"))
      local function get(k)
        return redis:cmd("EVAL", "redis.call('SELECT', 2) return redis.call('GET', KEYS[1])", 1, k)
      end
      assert.are.equal("42", get("n"))
      assert.are.equal(0.1, tonumber(get("f")))
      assert.are.equal("hello", get("s"))
      assert.are.equal("\0014", get("sn"):sub(1, 2)) -- marked: it reads back as a string
      assert.are.equal("2.5", get("c"))
      local ttl = redis:cmd("EVAL", "redis.call('SELECT', 2) return redis.call('TTL', KEYS[1])", 1, "t")
      assert.is_true(ttl > 90 and ttl <= 100, tostring(ttl))
      ttl = redis:cmd("EVAL", "redis.call('SELECT', 2) return redis.call('TTL', KEYS[1])", 1, "c")
      assert.is_true(ttl > 90 and ttl <= 100, tostring(ttl))
      redis:cmd("EVAL", "redis.call('SELECT', 2) return redis.call('SET', KEYS[1], '7')", 1, "byother")
      assert.are.equal("c", op(d, "<get>").cmd)
      assert.are.same({ { 42, 0.1, "hello", "42", "string", "\1x", 7, 2.5 } }, U.seen(d, "get"))
    end)

    it("Redis stopped mid-run: calls are nil, err, the worker serves; they work again once it is back", function()
      local own = S.redis()
      local port = own.port
      finally(function() own:stop() end)
      start([[
function H.envfrom(ctx, from)
  local n, err = store:incr("seen", 1)
  seen(ctx, from, { n, err })
  if not n then return nil end -- fail open
  return milter.reject{ reason = "number " .. n }
end
return H
]], { "--store", own.url })
      assert.are.equal("550 5.7.1 number 1", op(d, "<a@x>").text)
      own:stop()
      local r = op(d, "<b@x>")
      assert.are.equal("c", r.cmd)
      local b = U.seen(d, "<b@x>")[1]
      assert.is_nil(b[1])
      assert.is_truthy(b[2] == "closed" or b[2] == "connection refused", b[2])
      assert.are.equal("c", op(d, "<c@x>").cmd)
      assert.are.same({ { nil, "connection refused" } }, U.seen(d, "<c@x>"))
      own = S.redis { port = port }
      assert.are.equal("550 5.7.1 number 1", op(d, "<d@x>").text)
      assert.are.equal("550 5.7.1 number 2", op(d, "<e@x>").text)
      assert.is_true(d:alive())
    end)

    it("a Redis that never answers: nil, \"timeout\" within the handler's budget; other connections go on", function()
      local silent = assert(socket.bind("127.0.0.1", 0)) -- listens, never accepts
      finally(function() silent:close() end)
      local _, sport = silent:getsockname()
      start([[
function H.envfrom(ctx, from)
  if from == "<wait>" then seen(ctx, "wait", { store:get("k") }) end
end
return H
]], { "--store", "redis://127.0.0.1:" .. sport, "--script-timeout", "2" })
      local a = U.client(d)
      U.open(a)
      assert(a:send("M", "<wait>\0"))
      -- a's handler waits on the store; b's whole session is served meanwhile
      assert.are.equal("c", op(d, "<other>").cmd)
      assert.are.same({}, U.seen(d, "wait"))
      local r = assert(a:read_reply(10))
      assert.are.equal("c", r.cmd)
      assert.are.same({ { nil, "timeout" } }, U.seen(d, "wait"))
      a:close()
      assert.is_true(d:alive())
    end)

    it("a bad Redis URL is a usage error", function()
      D.write_file(dir .. "/s.lua", "return {}\n")
      local r = D.run({ "--store", "redis://not a host/0", dir .. "/s.lua" }, 10)
      assert.are.equal(2, r.status)
      assert.is_truthy(r.stderr:find("bad Redis URL", 1, true), r.stderr)
    end)
  end
end)
end
