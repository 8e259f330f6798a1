-- Greylisting on milter.store: the first attempt of each (client network,
-- sender, recipient) triplet is told to come back later; a retry at least
-- DELAY seconds later (and within RETRY seconds) is accepted and puts the
-- client's network on a whitelist for PASS seconds, so its next mail is
-- not delayed. Networks are /24 for IPv4 (a sending farm retries from a
-- sibling address), the whole address for IPv6. A failing store lets mail
-- through (fail open).
local milter = require "milter"
local DELAY = tonumber(os.getenv("GREY_DELAY") or "300")    -- 5 minutes
local RETRY = tonumber(os.getenv("GREY_RETRY") or "86400")  -- a day
local PASS = tonumber(os.getenv("GREY_PASS") or "2592000")  -- 30 days
local store = milter.store
local H = {}

local function network(ip)
  return ip:match("^(%d+%.%d+%.%d+)%.%d+$") or ip
end

local function unavailable(ctx, err)
  ctx:log("warn", "greylisting store unavailable:", err, "- accepting")
end

function H.envrcpt(ctx, rcpt)
  local ip = ctx.client and ctx.client.address
  if not ip then return end
  local net = network(ip)
  local known, err = store:get("grey:pass:" .. net)
  if err then return unavailable(ctx, err) end
  if known then return end
  local triplet = ("grey:%s:%s:%s"):format(net, (ctx.sender or ""):lower(), rcpt:lower())
  local first
  first, err = store:get(triplet)
  if err then return unavailable(ctx, err) end
  local now = os.time()
  if not first then
    store:set(triplet, now, RETRY)
    return milter.tempfail{ code = 451, xcode = "4.7.1", reason = "greylisted, try again later" }
  end
  if now - first < DELAY then
    return milter.tempfail{ code = 451, xcode = "4.7.1",
      reason = ("greylisted, try again in %d seconds"):format(DELAY - (now - first)) }
  end
  store:set("grey:pass:" .. net, now, PASS)
  store:del(triplet)
end

return H
