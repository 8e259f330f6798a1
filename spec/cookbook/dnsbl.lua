-- DNSBL at connect: refuse listed clients, fail open when the list cannot
-- answer (a DNS outage must not stop mail).
local milter = require "milter"
local ZONES = { os.getenv("DNSBL_ZONE") or "zen.spamhaus.org" }
local H = {}

function H.connect(ctx, _host, addr)
  if addr.family ~= "inet" and addr.family ~= "inet6" then return end
  for _, zone in ipairs(ZONES) do
    local hit, err = milter.dns.rbl(addr.address, zone, 2)
    if hit then
      return milter.reject{ code = 554, xcode = "5.7.1",
        reason = ("%s is listed at %s (%s)"):format(addr.address, zone, hit[1]) }
    elseif err then
      ctx:log("warn", "DNSBL", zone, "did not answer:", err, "- accepting")
    end
  end
end

return H
