-- The specs' clock for waits and durations: CLOCK_MONOTONIC, which a step
-- of the host's clock (NTP, an admin) does not move. socket.gettime is the
-- wall clock: a step during a wait cut it short or stretched it, and a
-- duration measured across one was wrong. Only what is compared with the
-- product's own wall-clock times (a store ttl, a greylisting delay) keeps
-- socket.gettime.
local ffi = require "ffi"

pcall(ffi.cdef, [[
struct lm_spec_timespec { long tv_sec; long tv_nsec; };
int clock_gettime(int clk, struct lm_spec_timespec *ts);
]])

local CLOCK_MONOTONIC = 1 -- Linux
local ts = ffi.new("struct lm_spec_timespec")

return function()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end
