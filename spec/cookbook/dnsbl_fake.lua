-- A --preload file for the DNSBL recipe's tests: 192.0.2.66 is listed,
-- every other address is not, and no DNS server is needed.
local milter = require "milter"

milter.dns.rbl = function(address, _zone)
  if address == "192.0.2.66" then return { "127.0.0.2" } end
  return false
end
