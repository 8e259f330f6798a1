-- The policy scripts/bench runs luamilter with: handlers envfrom, envrcpt,
-- header and eom, each doing a little real work, and an X-Bench header
-- added at eom. build/bench/benchref (the C reference responder) adds the
-- same header with the same value, so both servers send the same bytes.
--
-- With LUAMILTER_BENCH_DNSBL=1 (scripts/bench --dnsbl-delay) envfrom also
-- asks a DNSBL, which must say "not listed"; with LUAMILTER_BENCH_REDIS set
-- to a URL (scripts/bench --redis) it counts the message in Redis; with
-- LUAMILTER_BENCH_STORE=1 (scripts/bench --store lmdb|redis) it counts it
-- in milter.store, as a per-client rate limit would, and with
-- LUAMILTER_BENCH_STORE=worker the same rate limit counts in a table of
-- its worker's Lua state instead, as such policies did before the store
-- (scripts/bench --store runs all three: the store, per worker, neither).
--
-- With LUAMILTER_BENCH_EOM_ONLY=1 (scripts/bench --eom-only-policy) the
-- policy is its eom handler alone, adding a fixed X-Bench header: luamilter
-- then asks the MTA for no reply but the BODYEOB one, the round-trip floor.
--
-- With LUAMILTER_BENCH_BODY=1 in the environment the script also handles
-- body (counting the bytes), so that luamilter asks the MTA for the body:
-- scripts/bench --body-sweep uses it to measure the cost of body bytes.
local milter = require "milter"

local H = {}

local BLOCKED = "<blocked@bench.invalid>"

local DNSBL = os.getenv("LUAMILTER_BENCH_DNSBL") == "1"
local REDIS = os.getenv("LUAMILTER_BENCH_REDIS")
local redis = REDIS and milter.redis.new(REDIS)
local STORE = os.getenv("LUAMILTER_BENCH_STORE") == "1"
local WORKER = os.getenv("LUAMILTER_BENCH_STORE") == "worker"
local RATE_LIMIT = 1e15 -- messages per client and minute: never reached

-- The per-worker counter: like store:incr(key, 1, ttl), but each worker
-- has its own.
local counts = {}
local function count_here(key, ttl)
  local now = os.time()
  local c = counts[key]
  if not c or c.expires <= now then
    c = { n = 0, expires = now + ttl }
    counts[key] = c
  end
  c.n = c.n + 1
  return c.n
end

function H.envfrom(ctx, sender)
  ctx.msg.from = sender
  if DNSBL then -- scripts/bench --dnsbl-delay: one lookup per message
    local hit, err = milter.dns.rbl("192.0.2.1", "bl.bench.invalid", 2)
    if hit or err then
      return milter.tempfail{ reason = "dnsbl: " .. tostring(err or hit[1]) }
    end
  end
  if redis then -- scripts/bench --redis: a counter per message
    local res, err = redis:pipeline{ { "INCR", "bench:count" }, { "EXPIRE", "bench:count", 60 } }
    if not res then return milter.tempfail{ reason = "redis: " .. tostring(err) } end
  end
  if STORE or WORKER then -- scripts/bench --store: one counter per client and minute
    local key = "rate:" .. tostring(ctx.client and ctx.client.address)
    local n, err
    if STORE then n, err = milter.store:incr(key, 1, 60) else n = count_here(key, 60) end
    if not n then return milter.tempfail{ reason = "store: " .. tostring(err) } end
    if n > RATE_LIMIT then return milter.tempfail{ reason = "rate limit" } end
  end
end

function H.envrcpt(ctx, rcpt)
  if rcpt == BLOCKED then
    return milter.reject{ code = 550, xcode = "5.7.1", reason = "recipient blocked" }
  end
  ctx.msg.rcpts = (ctx.msg.rcpts or 0) + 1
end

function H.header(ctx, name, value)
  ctx.msg.headers = (ctx.msg.headers or 0) + 1
  if name:lower() == "subject" and value:find("BENCH-REJECT", 1, true) then
    return milter.reject{}
  end
end

if os.getenv("LUAMILTER_BENCH_BODY") == "1" then
  function H.body(ctx, chunk)
    ctx.msg.bytes = (ctx.msg.bytes or 0) + #chunk
  end
end

if os.getenv("LUAMILTER_BENCH_EOM_ONLY") == "1" then
  return {
    eom = function()
      return milter.accept{ add_header = { { "X-Bench", "eom-only" } } }
    end,
  }
end

function H.eom(ctx)
  local m = ctx.msg
  local value = string.format("rcpts=%d headers=%d", m.rcpts or 0, m.headers or 0)
  if m.bytes then value = value .. string.format(" bytes=%d", m.bytes) end
  return milter.accept{ add_header = { { "X-Bench", value } } }
end

return H
