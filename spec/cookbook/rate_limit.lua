-- Per-client rate limit on milter.store: at most LIMIT messages per WINDOW
-- seconds from one client address, counted by every worker (and by every
-- host that shares the store, on Redis); beyond it the sender is told to
-- try again later. The window starts with the client's first message. A
-- failing store lets mail through (fail open): a counter must not stop
-- mail.
local milter = require "milter"
local LIMIT = tonumber(os.getenv("RATE_LIMIT") or "100")
local WINDOW = tonumber(os.getenv("RATE_WINDOW") or "60") -- seconds
local H = {}

function H.envfrom(ctx)
  local ip = ctx.client and ctx.client.address
  if not ip then return end -- a local submission without an address
  -- incr sets the ttl only when it creates the key: a fixed window
  local n, err = milter.store:incr("rate:" .. ip, 1, WINDOW)
  if not n then
    ctx:log("warn", "rate counter unavailable:", err, "- accepting")
    return
  end
  if n > LIMIT then
    return milter.tempfail{ code = 451, xcode = "4.7.1",
      reason = ("too many messages from %s, try again later"):format(ip) }
  end
end

return H
