--- milter.test: unit-test a policy without a daemon.
--
-- Runs `luamilter test --json` (the same session and Lua bridge the daemon
-- uses) and returns its report as a table:
--
--   local mt = require "milter.test"
--   local r = mt.run{ script = "policy.lua", message = mt.message{
--     headers = { { "From", "a@example.net" }, { "To", "b@example.org" },
--                 { "Subject", "hi" } },
--     body = "hello\r\n" } }
--   assert(r.final.action == "accept")
--   assert(r.message:find("X%-Scanned: yes"))
--
-- run{} takes: script (path), message (the message text) or file (path),
-- or several: messages (a list of texts) or files (a list of paths), played
-- on one connection, or each on its own with each_connection = true (the
-- report is then {messages = {report, ...}});
-- from, rcpt (list), client, helo, macros ({name = value}), settings
-- ({name = value}: --set), preload (a Lua file run before the script, e.g.
-- one that fakes milter.dns.query), bin (the luamilter binary: default
-- $LUAMILTER_BIN, ./build/luamilter, luamilter).
-- It returns the decoded report (stages, final, modifications, envelope,
-- quarantine, message), plus `status` (the exit status: 0 delivered,
-- 1 refused/discarded, 2 error) and `stderr` (the log lines).
local cjson = require "cjson.safe"

local M = {}

local function shell_quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

local function default_bin()
  local env = os.getenv("LUAMILTER_BIN")
  if env and env ~= "" then return env end
  if exists("./build/luamilter") then return "./build/luamilter" end
  return "luamilter"
end

local function slurp(path)
  local f = io.open(path, "rb")
  if not f then return "" end
  local s = f:read("*a")
  f:close()
  return s
end

local function exit_status(a, b, c)
  if type(a) == "number" then -- Lua 5.1 os.execute: the wait status
    return a >= 256 and math.floor(a / 256) or a
  end
  if b == "exit" then return c end
  return 128 + (c or 0)
end

--- Builds a message from parts: headers ({name, value} pairs, in order),
-- body (a string; CRLF or LF line ends).
function M.message(t)
  local out = {}
  for _, h in ipairs(t.headers or {}) do
    out[#out + 1] = h[1] .. ": " .. h[2] .. "\r\n"
  end
  if t.body then
    out[#out + 1] = "\r\n" .. t.body
  end
  return table.concat(out)
end

--- Runs one offline session and returns its report (see above).
function M.run(t)
  assert(type(t) == "table" and t.script, "run{script=..., message=... or file=...}")
  local tmp = os.tmpname()
  local files, made = {}, {}
  for _, p in ipairs(t.files or { t.file }) do files[#files + 1] = p end
  if #files == 0 then
    local texts = t.messages or { (assert(t.message, "run{} needs message, file, messages or files")) }
    for i, text in ipairs(texts) do
      local path = tmp .. "." .. i .. ".eml"
      local f = assert(io.open(path, "wb"))
      f:write(text)
      f:close()
      files[i], made[i] = path, path
    end
  end
  local args = { shell_quote(t.bin or default_bin()) }
  if t.store then args[#args + 1] = "--store " .. shell_quote(t.store) end -- before "test"
  args[#args + 1] = "test"
  args[#args + 1] = shell_quote(t.script)
  for _, p in ipairs(files) do args[#args + 1] = shell_quote(p) end
  args[#args + 1] = "--json"
  if t.each_connection then args[#args + 1] = "--each-connection" end
  if t.from then args[#args + 1] = "--from " .. shell_quote(t.from) end
  for _, r in ipairs(t.rcpt or {}) do args[#args + 1] = "--rcpt " .. shell_quote(r) end
  if t.client then args[#args + 1] = "--client " .. shell_quote(t.client) end
  if t.helo then args[#args + 1] = "--helo " .. shell_quote(t.helo) end
  for _, o in ipairs({ { "macros", "--macro " }, { "settings", "--set " } }) do
    local kv, names = t[o[1]] or {}, {}
    for k in pairs(kv) do names[#names + 1] = k end
    table.sort(names)
    for _, k in ipairs(names) do
      args[#args + 1] = o[2] .. shell_quote(k .. "=" .. tostring(kv[k]))
    end
  end
  if t.preload then args[#args + 1] = "--preload " .. shell_quote(t.preload) end
  local cmd = table.concat(args, " ") .. " >" .. shell_quote(tmp .. ".out") .. " 2>" .. shell_quote(tmp .. ".err")
  local status = exit_status(os.execute(cmd))
  local out, err = slurp(tmp .. ".out"), slurp(tmp .. ".err")
  for _, p in ipairs({ tmp, tmp .. ".out", tmp .. ".err" }) do os.remove(p) end
  for _, p in ipairs(made) do os.remove(p) end
  local report = cjson.decode(out)
  if type(report) ~= "table" then
    report = { error = err ~= "" and err or "no report" }
  end
  report.status = status
  report.stderr = err
  return report
end

return M
