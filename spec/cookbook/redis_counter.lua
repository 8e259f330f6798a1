-- A Redis counter: at most LIMIT messages a minute from one client address;
-- beyond it the sender is told to try again later. When Redis is down or
-- slow the mail goes through (fail open): a counter must not stop mail.
local milter = require "milter"
local redis = milter.redis.new(os.getenv("REDIS_URL") or "redis://127.0.0.1:6379/0")
local LIMIT = tonumber(os.getenv("RATE_LIMIT") or "100")
local WINDOW = 60 -- seconds
local H = {}

function H.envfrom(ctx)
  local client = ctx.client and ctx.client.address
  if not client then return end
  -- one key per client and minute; INCR and EXPIRE in one round trip
  local key = ("rate:%s:%d"):format(client, math.floor(os.time() / WINDOW))
  local res, err = redis:pipeline({ { "INCR", key }, { "EXPIRE", key, WINDOW } }, 1)
  if not res or type(res[1]) ~= "number" then
    ctx:log("warn", "rate counter unavailable:", err, "- accepting")
    return
  end
  if res[1] > LIMIT then
    return milter.tempfail{ code = 451, xcode = "4.7.1",
      reason = ("too many messages from %s, try again later"):format(client) }
  end
end

return H
