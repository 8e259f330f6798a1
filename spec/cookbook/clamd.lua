-- clamd at end of message over TCP (INSTREAM): infected mail is rejected;
-- when the scanner cannot answer the message is tempfailed, so nothing
-- unscanned is delivered and the sender retries later.
local milter = require "milter"
local bit = require "bit"
local HOST = os.getenv("CLAMD_HOST") or "127.0.0.1"
local PORT = tonumber(os.getenv("CLAMD_PORT") or "3310")
local CHUNK = 65536
local H = {}

local function u32(n)
  return string.char(bit.band(bit.rshift(n, 24), 255), bit.band(bit.rshift(n, 16), 255),
                     bit.band(bit.rshift(n, 8), 255), bit.band(n, 255))
end

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

local function scan(data)
  local s, err = milter.tcp.connect(HOST, PORT, { timeout = 5 })
  if not s then return nil, err end
  local ok
  ok, err = s:send("zINSTREAM\0")
  for i = 1, #data, CHUNK do
    if not ok then break end
    local piece = data:sub(i, i + CHUNK - 1)
    ok, err = s:send(u32(#piece) .. piece)
  end
  if ok then ok, err = s:send(u32(0)) end
  if not ok then return nil, err end
  local reply
  reply, err = s:receive("*a")       -- clamd answers and closes
  if not reply then return nil, err end
  return (reply:gsub("%z$", ""))     -- "stream: OK" or "stream: NAME FOUND"
end

function H.eom(ctx)
  local m = ctx.msg
  local data = table.concat(m.raw or {}) .. "\r\n" .. table.concat(m.body or {})
  local verdict, err = scan(data)
  if not verdict then
    ctx:log("warn", "clamd:", err)
    return milter.tempfail{ reason = "virus scanner unavailable, try again later" }
  end
  local virus = verdict:match("^stream: (.+) FOUND$")
  if virus then
    return milter.reject{ code = 554, xcode = "5.7.1", reason = "infected: " .. virus }
  end
  return milter.accept{ add_header = { { "X-Virus-Scanned", "clamd" } } }
end

return H
