-- rspamd at end of message: POST the message to rspamd's /checkv2 with the
-- envelope in rspamd's own request headers, and add its score, action and
-- symbols as headers. Fail open: when rspamd cannot answer, mail goes
-- unscored.
local milter = require "milter"
local cjson = require "cjson.safe"
local URL = os.getenv("RSPAMD_URL") or "http://127.0.0.1:11333/checkv2"
local H = {}

function H.header(ctx, name, value)
  local m = ctx.msg
  m.raw = m.raw or {}
  m.raw[#m.raw + 1] = name .. ": " .. value .. "\r\n"
end

function H.body(ctx, chunk)
  local m = ctx.msg
  m.body = m.body or {}
  m.body[#m.body + 1] = chunk
end

local function check(ctx)
  local m, client = ctx.msg, ctx.client
  local res, err = milter.http.request{
    url = URL, method = "POST", timeout = 10,
    headers = {
      ["Content-Type"] = "message/rfc822",
      From = ctx.sender,                 -- envelope sender, "<a@example.org>"
      Rcpt = ctx.rcpts,                  -- a list: one Rcpt header per recipient
      IP = client and client.family:find("^inet") and client.address or nil,
      Helo = ctx.helo,
      ["Queue-Id"] = ctx:macro("i"),
      User = ctx:macro("{auth_authen}"), -- the SASL login, if any
    },
    body = table.concat(m.raw or {}) .. "\r\n" .. table.concat(m.body or {}),
  }
  if not res then return nil, err end
  if res.status ~= 200 then return nil, "status " .. res.status end
  local reply, jerr = cjson.decode(res.body)
  if type(reply) ~= "table" or type(reply.score) ~= "number" then
    return nil, "bad reply: " .. tostring(jerr or res.body:sub(1, 80))
  end
  return reply
end

-- "MISSING_DATE(1.00), MISSING_MID(2.50)...": by name, folded one a line
local function symbols(reply)
  local out = {}
  for name, sym in pairs(type(reply.symbols) == "table" and reply.symbols or {}) do
    out[#out + 1] = ("%s(%.2f)"):format(name, type(sym) == "table" and tonumber(sym.score) or 0)
  end
  table.sort(out)
  return table.concat(out, ",\n\t")
end

function H.eom(ctx)
  local reply, err = check(ctx)
  if not reply then
    ctx:log("warn", "rspamd:", err, "- delivering unscored")
    return
  end
  return milter.accept{ add_header = {
    { "X-Spam-Score", ("%.2f / %.2f"):format(reply.score, reply.required_score or 0) },
    { "X-Spam-Action", tostring(reply.action) },
    { "X-Spam-Symbols", symbols(reply) },
  } }
end

return H
