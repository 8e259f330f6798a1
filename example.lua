-- example.lua: a starting policy for luamilter.
--
-- Try it offline first:   luamilter check example.lua
-- Serve it:               luamilter -l inet:8890@127.0.0.1 example.lua
-- Reload after editing:   kill -HUP <pid>   (a broken edit keeps the old policy)
--
-- Every handler is optional; luamilter asks the MTA only for the events a
-- script handles. Returning nothing means "continue".
local milter = require "milter"

---------------------------------------------------------------------------
-- Settings: edit these.
---------------------------------------------------------------------------

-- Client networks we never take mail from (IPv4 prefixes, as strings).
local blocked_networks = { "192.0.2.", "198.51.100." }

-- Envelope senders we refuse, lower-case, without angle brackets.
local blocked_senders = {
  ["spammer@example.net"] = true,
}

-- Domains whose mail is ours: everything else is "external".
local internal_domains = { ["example.org"] = true }

-- Mail to this domain is copied to the auditor.
local audited_domain = "finance.example.org"
local auditor = "<audit@example.org>"

---------------------------------------------------------------------------

local function domain_of(addr)
  return (addr:match("@([^>%s]+)>?$") or ""):lower()
end

local function bare(addr)
  return (addr:gsub("^<", ""):gsub(">$", "")):lower()
end

local H = {}

-- connect: refuse listed networks before anything else is said.
function H.connect(ctx, host, addr)
  if addr.family ~= "inet" then return end
  for _, prefix in ipairs(blocked_networks) do
    if addr.address:sub(1, #prefix) == prefix then
      ctx:log("info", "refusing client", host, addr.address)
      return milter.reject{
        code = 554, xcode = "5.7.1",
        reason = { "Your network is not allowed to send mail here.",
                   "Contact postmaster@example.org if this is a mistake." },
      }
    end
  end
end

-- envfrom: refuse listed senders with a multi-line reply.
function H.envfrom(ctx, sender)
  if blocked_senders[bare(sender)] then
    return milter.reject{
      code = 550, xcode = "5.7.1",
      reason = { "Sender " .. sender .. " is blocked by local policy.",
                 "Contact postmaster@example.org if this is a mistake." },
    }
  end
  ctx.msg.external = not internal_domains[domain_of(sender)]
end

-- envrcpt: remember whether the audited domain is among the recipients.
function H.envrcpt(ctx, rcpt)
  if domain_of(rcpt) == audited_domain then ctx.msg.audit = true end
end

-- eom: all modifications happen here, once the whole message was seen.
function H.eom(ctx)
  local mods = {
    add_header = { { "X-Policy", "luamilter example; client=" ..
                     ((ctx.client and ctx.client.address) or "unknown") } },
  }
  if ctx.msg.external then
    local subject = ctx:header("Subject") or ""
    if not subject:find("^%[EXTERNAL%]") then
      -- change_header on a message without Subject adds one.
      mods.change_header = { { "Subject", 1, "[EXTERNAL] " .. subject } }
    end
  end
  if ctx.msg.audit then
    mods.add_rcpt = { auditor }
  end
  return milter.accept(mods)
end

return H
