-- Independent MTA-side implementation of the milter protocol (test support).
-- Deliberately shares no code with the server: a codec bug there must not be
-- able to cancel itself out here.  See /work/shared/milter-protocol.md.
local socket = require "socket"
local bit = require "bit"
local now = require "spec.support.clock" -- monotonic, for waits

local band = bit.band

local M = {}

M.SMFIF = {
  ADDHDRS = 0x1, CHGBODY = 0x2, MODBODY = 0x2, ADDRCPT = 0x4, DELRCPT = 0x8,
  CHGHDRS = 0x10, QUARANTINE = 0x20, CHGFROM = 0x40, ADDRCPT_PAR = 0x80,
  SETSYMLIST = 0x100,
}

M.SMFIP = {
  NOCONNECT = 0x1, NOHELO = 0x2, NOMAIL = 0x4, NORCPT = 0x8, NOBODY = 0x10,
  NOHDRS = 0x20, NOEOH = 0x40, NR_HDR = 0x80, NOHREPL = 0x80,
  NOUNKNOWN = 0x100, NODATA = 0x200, SKIP = 0x400, RCPT_REJ = 0x800,
  NR_CONN = 0x1000, NR_HELO = 0x2000, NR_MAIL = 0x4000, NR_RCPT = 0x8000,
  NR_DATA = 0x10000, NR_UNKN = 0x20000, NR_EOH = 0x40000, NR_BODY = 0x80000,
  HDR_LEADSPC = 0x100000, MDS_256K = 0x10000000, MDS_1M = 0x20000000,
}

-- {version, actions, protocol} as offered by real MTAs (doc section 3)
M.OFFER = {
  postfix = { 6, 0x1ff, 0x1fffff },
  sendmail = { 6, 0x1ff, 0x1fffff },
  stalwart = { 6, 0xff, 0x42 },
  stalwart2 = { 2, 0xff, 0x42 },
  postfix2 = { 2, 0x1ff, 0x7f },
}

local P = M.SMFIP
-- event name -> command byte, NO* bit, NR* bit, minimum protocol version,
-- and whether Postfix still sends the MACRO packet when NO* suppresses it
local EVENTS = {
  connect = { cmd = "C", no = P.NOCONNECT, nr = P.NR_CONN, macro_on_skip = true },
  helo = { cmd = "H", no = P.NOHELO, nr = P.NR_HELO, macro_on_skip = true },
  mail = { cmd = "M", no = P.NOMAIL, nr = P.NR_MAIL, macro_on_skip = true },
  rcpt = { cmd = "R", no = P.NORCPT, nr = P.NR_RCPT, macro_on_skip = true },
  data = { cmd = "T", no = P.NODATA, nr = P.NR_DATA, minver = 4, macro_on_skip = true },
  header = { cmd = "L", no = P.NOHDRS, nr = P.NR_HDR },
  eoh = { cmd = "N", no = P.NOEOH, nr = P.NR_EOH },
  body = { cmd = "B", no = P.NOBODY, nr = P.NR_BODY },
  unknown = { cmd = "U", no = P.NOUNKNOWN, nr = P.NR_UNKN, minver = 3 },
  eom = { cmd = "E" },
}

local FINAL = { c = true, a = true, r = true, t = true, d = true, y = true,
  s = true, ["4"] = true, f = true }

---------------------------------------------------------------------------
-- encoding helpers

local function u32(n)
  return string.char(math.floor(n / 16777216) % 256, math.floor(n / 65536) % 256,
    math.floor(n / 256) % 256, n % 256)
end

local function get_u32(s, i)
  local a, b, c, d = s:byte(i, i + 3)
  return ((a * 256 + b) * 256 + c) * 256 + d
end

local function frame(cmd, payload)
  payload = payload or ""
  assert(#cmd == 1, "command must be one byte")
  return u32(#payload + 1) .. cmd .. payload
end

local function cstrs(list)
  local out = {}
  for i, s in ipairs(list) do out[i] = s .. "\0" end
  return table.concat(out)
end

-- split a payload made only of NUL-terminated strings; error unless the
-- number of strings is within [min, max]
local function split_strict(data, min, max, what)
  local out, pos = {}, 1
  while pos <= #data do
    local z = data:find("\0", pos, true)
    if not z then error(what .. ": missing NUL terminator", 0) end
    out[#out + 1] = data:sub(pos, z - 1)
    pos = z + 1
  end
  if #out < min or #out > (max or min) then
    error(string.format("%s: expected %d..%d strings, got %d", what, min, max or min, #out), 0)
  end
  return out
end

M.u32, M.get_u32, M.frame = u32, get_u32, frame

-- modification / progress frame decoders (strict)
local DECODE = {
  h = function(d)
    local s = split_strict(d, 2, 2, "ADDHEADER")
    return { op = "addheader", name = s[1], value = s[2] }
  end,
  i = function(d)
    if #d < 4 then error("INSHEADER: short payload", 0) end
    local s = split_strict(d:sub(5), 2, 2, "INSHEADER")
    return { op = "insheader", index = get_u32(d, 1), name = s[1], value = s[2] }
  end,
  m = function(d)
    if #d < 4 then error("CHGHEADER: short payload", 0) end
    local s = split_strict(d:sub(5), 2, 2, "CHGHEADER")
    return { op = "chgheader", index = get_u32(d, 1), name = s[1], value = s[2] }
  end,
  e = function(d)
    local s = split_strict(d, 1, 2, "CHGFROM")
    return { op = "chgfrom", addr = s[1], args = s[2] }
  end,
  ["+"] = function(d)
    return { op = "addrcpt", addr = split_strict(d, 1, 1, "ADDRCPT")[1] }
  end,
  ["2"] = function(d)
    local s = split_strict(d, 2, 2, "ADDRCPT_PAR")
    return { op = "addrcpt_par", addr = s[1], args = s[2] }
  end,
  ["-"] = function(d)
    return { op = "delrcpt", addr = split_strict(d, 1, 1, "DELRCPT")[1] }
  end,
  b = function(d) return { op = "replbody", data = d } end,
  q = function(d)
    return { op = "quarantine", reason = split_strict(d, 1, 1, "QUARANTINE")[1] }
  end,
  p = function(d)
    if d ~= "" then error("PROGRESS: unexpected payload", 0) end
    return { op = "progress" }
  end,
}

---------------------------------------------------------------------------
-- client object

local Client = {}
Client.__index = Client

local function parse_spec(spec)
  local kind, rest = spec:match("^(%a+%d?):(.*)$")
  if not kind then kind, rest = "unix", spec end
  if kind == "unix" or kind == "local" then return "unix", rest end
  if kind ~= "inet" and kind ~= "inet6" then return nil, "unsupported spec " .. spec end
  local port, host = rest:match("^(%d+)@%[?([^%]]+)%]?$")
  if not port then host, port = rest:match("^%[?(.-)%]?:(%d+)$") end
  if not port then port = rest:match("^(%d+)$") end
  if not port then return nil, "bad spec " .. spec end
  host = host or (kind == "inet6" and "::1" or "127.0.0.1")
  return kind, host, tonumber(port)
end

function M.connect(spec, opts)
  opts = opts or {}
  local timeout = opts.timeout or 5
  local kind, a, b = parse_spec(spec)
  if not kind then return nil, a end
  local sock, err
  if kind == "unix" then
    sock, err = require("socket.unix").stream()
  elseif kind == "inet6" or a:find(":", 1, true) then -- an IPv6 literal
    sock, err = socket.tcp6()
  else
    sock, err = socket.tcp()
  end
  if not sock then return nil, err end
  sock:settimeout(timeout, "t")
  local ok, cerr
  if kind == "unix" then ok, cerr = sock:connect(a) else ok, cerr = sock:connect(a, b) end
  if not ok then
    sock:close()
    return nil, cerr
  end
  return setmetatable({ sock = sock, timeout = timeout, buf = "", spec = spec }, Client)
end

function Client:send_raw(bytes)
  local deadline, i = now() + self.timeout, 1
  while i <= #bytes do
    local rem = deadline - now()
    if rem <= 0 then return nil, "timeout" end
    self.sock:settimeout(rem, "t")
    local last, err, partial = self.sock:send(bytes, i)
    if last then
      i = last + 1
    else
      if err ~= "timeout" then return nil, err end
      i = partial + 1
    end
  end
  return true
end

function Client:send(cmd, payload)
  return self:send_raw(frame(cmd, payload))
end

-- make self.buf hold at least n bytes, or fail ("closed", "timeout", ...)
local function fill(self, n, deadline)
  while #self.buf < n do
    local rem = deadline - now()
    if rem <= 0 then return nil, "timeout" end
    self.sock:settimeout(rem, "t")
    local data, err, partial = self.sock:receive(n - #self.buf)
    local got = data or partial
    if got and got ~= "" then self.buf = self.buf .. got end
    if not data and err ~= "timeout" then return nil, err end
  end
  return true
end

-- read one frame; timeout overrides the client's default for this call
function Client:read_frame(timeout)
  local deadline = now() + (timeout or self.timeout)
  local ok, err = fill(self, 4, deadline)
  if not ok then return nil, err end
  local len = get_u32(self.buf, 1)
  if len == 0 then return nil, "bad frame length 0" end
  if len > 64 * 1024 * 1024 then return nil, "frame too large: " .. len end
  ok, err = fill(self, 4 + len, deadline)
  if not ok then return nil, err end
  local f = { cmd = self.buf:sub(5, 5), data = self.buf:sub(6, 4 + len) }
  self.buf = self.buf:sub(5 + len)
  return f
end

-- read modification/progress frames up to and including a final reply;
-- returns {cmd=, text=, mods=, frames=} or nil, err, frames
function Client:read_reply(timeout)
  local frames, mods = {}, {}
  while true do
    local f, err = self:read_frame(timeout)
    if not f then return nil, err, frames end
    frames[#frames + 1] = f
    if FINAL[f.cmd] then
      local r = { cmd = f.cmd, mods = mods, frames = frames }
      if f.cmd == "y" then
        local ok, s = pcall(split_strict, f.data, 1, 1, "REPLYCODE")
        if not ok then return nil, s, frames end
        r.text = s[1]
      elseif f.data ~= "" then
        return nil, string.format("reply '%s' with unexpected payload", f.cmd), frames
      end
      return r
    end
    local dec = DECODE[f.cmd]
    if not dec then
      return nil, string.format("unexpected frame '%s' (0x%02x)", f.cmd, f.cmd:byte()), frames
    end
    local ok, m = pcall(dec, f.data)
    if not ok then return nil, m, frames end
    mods[#mods + 1] = m
  end
end

function Client:optneg(version, actions, protocol)
  if type(version) == "table" then version, actions, protocol = unpack(version) end
  self.offer = { version = version, actions = actions, protocol = protocol }
  local ok, err = self:send("O", u32(version) .. u32(actions) .. u32(protocol))
  if not ok then return nil, err end
  local f
  f, err = self:read_frame()
  if not f then return nil, err end
  if f.cmd ~= "O" then return nil, "unexpected reply '" .. f.cmd .. "' to OPTNEG", f end
  local d = f.data
  if #d < 12 then return nil, "short OPTNEG reply (" .. #d .. " bytes)", f end
  local neg = { version = get_u32(d, 1), actions = get_u32(d, 5),
    protocol = get_u32(d, 9), symlists = {} }
  local pos = 13
  while pos <= #d do
    local z = d:find("\0", pos + 4, true)
    if pos + 4 > #d or not z then return nil, "malformed symlist in OPTNEG reply", f end
    neg.symlists[get_u32(d, pos)] = d:sub(pos + 4, z - 1)
    pos = z + 1
  end
  self.neg = neg
  return neg
end

function Client:macro(cmd, macros)
  local list = {}
  for _, kv in ipairs(macros) do
    list[#list + 1] = kv[1]
    list[#list + 1] = kv[2]
  end
  return self:send("D", cmd .. cstrs(list))
end

-- send one event honouring the negotiated NO*/NR* bits and version
function Client:event(name, payload, macros)
  local ev = EVENTS[name]
  local neg = self.neg or { version = 6, protocol = 0 }
  if ev.minver and neg.version < ev.minver then return "skipped" end
  local skip = ev.no and band(neg.protocol, ev.no) ~= 0
  local ok, err
  if macros and (ev.macro_on_skip or not skip) then
    ok, err = self:macro(ev.cmd, macros)
    if not ok then return nil, err end
  end
  if skip then return "skipped" end
  ok, err = self:send(ev.cmd, payload)
  if not ok then return nil, err end
  if ev.nr and band(neg.protocol, ev.nr) ~= 0 then return "noreply" end
  return self:read_reply()
end

function Client:connect_ev(host, family, port, addr, macros)
  local p = host .. "\0" .. family
  if family ~= "U" then
    p = p .. string.char(math.floor(port / 256) % 256, port % 256) .. addr .. "\0"
  end
  return self:event("connect", p, macros)
end

function Client:helo(name, macros) return self:event("helo", name .. "\0", macros) end

function Client:mail(sender, args, macros)
  return self:event("mail", sender .. "\0" .. cstrs(args or {}), macros)
end

function Client:rcpt(rcpt, args, macros)
  return self:event("rcpt", rcpt .. "\0" .. cstrs(args or {}), macros)
end

function Client:data(macros) return self:event("data", "", macros) end

function Client:header(name, value, macros)
  return self:event("header", name .. "\0" .. value .. "\0", macros)
end

function Client:eoh(macros) return self:event("eoh", "", macros) end
function Client:body(chunk, macros) return self:event("body", chunk, macros) end
function Client:eom(macros) return self:event("eom", "", macros) end
function Client:unknown(cmd, macros) return self:event("unknown", cmd .. "\0", macros) end
function Client:abort() return self:send("A") end
function Client:quit() return self:send("Q") end
function Client:quit_nc() return self:send("K") end

function Client:close()
  if self.sock then self.sock:close() end
  self.sock = nil
end

---------------------------------------------------------------------------
-- whole Postfix-like session

local STOP = { a = true, r = true, t = true, d = true, y = true, ["4"] = true, f = true }
local RCPT_REJECTED = { r = true, t = true, y = true }

local function cmd_of(r) return type(r) == "table" and r.cmd or nil end

local function bare(addr) return (addr:gsub("^<(.*)>$", "%1")) end

-- opts: offer, connect={host,family,port,addr}, helo (false = no HELO),
-- mail, mail_args, rcpts, rcpt_args, headers={{n,v}...}, body,
-- macros (false = no MACRO packets; table keyed by command char overrides)
function Client:session(opts)
  opts = opts or {}
  local res = { rcpts = {}, headers = {}, body = {} }
  if not self.neg then
    local neg, err = self:optneg(opts.offer or M.OFFER.postfix)
    if not neg then res.error, res.stopped = err, "optneg"; return res end
  end
  local conn = opts.connect or {}
  local host, addr = conn.host or "client.example.org", conn.addr or "192.0.2.1"
  local sender = opts.mail or "<sender@example.org>"
  local rcpts = opts.rcpts or { "<rcpt@example.org>" }
  local qid = { { "i", "4F2A1B3C5D" } }
  local defaults = {
    C = { { "j", "mta.example.org" }, { "{daemon_name}", "mta.example.org" },
      { "v", "Postfix 3.7.11" }, { "_", host .. " [" .. addr .. "]" } },
    H = {}, M = { { "{mail_addr}", bare(sender) }, { "{mail_mailer}", "smtp" } },
    T = qid, L = qid, N = qid, B = qid, E = qid,
  }
  local function mac(ch, dflt)
    if opts.macros == false then return nil end
    if opts.macros and opts.macros[ch] ~= nil then return opts.macros[ch] or nil end
    return dflt or defaults[ch]
  end
  -- store a reply; true when the session must stop here.  Postfix treats
  -- DISCARD at CONNECT/HELO as continue (discard_ok).
  local function step(stage, r, err, list, discard_ok)
    if list then list[#list + 1] = r or err else res[stage] = r end
    if r == nil then res.error, res.stopped = err, stage; return true end
    local c = cmd_of(r)
    if STOP[c] and not (discard_ok and c == "d") then res.stopped = stage; return true end
    return false
  end
  local function abort_stop()
    if not res.error then self:abort() end
    return res
  end

  local r, err = self:connect_ev(host, conn.family or "4", conn.port or 40000, addr, mac("C"))
  if step("connect", r, err, nil, true) then return res end
  if opts.helo ~= false then
    r, err = self:helo(opts.helo or "client.example.org", mac("H"))
    if step("helo", r, err, nil, true) then return res end
  end
  r, err = self:mail(sender, opts.mail_args, mac("M"))
  if step("mail", r, err) then return abort_stop() end
  local accepted = 0
  for _, rc in ipairs(rcpts) do
    r, err = self:rcpt(rc, opts.rcpt_args, mac("R", { { "{rcpt_addr}", bare(rc) } }))
    res.rcpts[#res.rcpts + 1] = r or err
    if r == nil then res.error, res.stopped = err, "rcpt"; return res end
    local c = cmd_of(r)
    if STOP[c] and not RCPT_REJECTED[c] then res.stopped = "rcpt"; return abort_stop() end
    if not RCPT_REJECTED[c] then accepted = accepted + 1 end
  end
  if accepted == 0 then res.stopped = "rcpt"; return abort_stop() end
  r, err = self:data(mac("T"))
  if step("data", r, err) then return abort_stop() end
  for _, h in ipairs(opts.headers or { { "From", "Sender <sender@example.org>" },
      { "To", "rcpt@example.org" }, { "Subject", "test" } }) do
    r, err = self:header(h[1], h[2], mac("L"))
    if step("headers", r, err, res.headers) then return abort_stop() end
  end
  r, err = self:eoh(mac("N"))
  if step("eoh", r, err) then return abort_stop() end
  local body, pos = opts.body or "Hello.\r\n", 1
  while pos <= #body do
    r, err = self:body(body:sub(pos, pos + 65534), mac("B"))
    if step("body", r, err, res.body) then return abort_stop() end
    if cmd_of(r) == "s" then break end
    pos = pos + 65535
  end
  r, err = self:eom(mac("E"))
  step("eom", r, err)
  return abort_stop()
end

---------------------------------------------------------------------------

function M.wait_socket(spec, timeout)
  local deadline = now() + (timeout or 5)
  local last
  repeat
    local c, err = M.connect(spec, { timeout = 0.5 })
    if c then c:close(); return true end
    last = err
    socket.sleep(0.02)
  until now() >= deadline
  return false, last or "timeout"
end

return M
