-- luacheck: std +busted
-- The specs' own clock (spec/support/clock.lua): every wait and duration in
-- the suite reads it, so it must be the monotonic clock, not the wall clock
-- a host's clock step moves.
package.path = "./?.lua;" .. package.path
local now = require "spec.support.clock"
local socket = require "socket"

describe("the specs' clock", function()
  it("is CLOCK_MONOTONIC (seconds since boot), not the wall clock", function()
    local up = assert(io.open("/proc/uptime")):read("*n")
    local t = now()
    -- /proc/uptime is CLOCK_BOOTTIME, which runs ahead of CLOCK_MONOTONIC
    -- by the time spent suspended: the two agree here within an hour
    assert.is_true(math.abs(t - up) < 3600, ("%f against uptime %f"):format(t, up))
    assert.is_true(socket.gettime() - t > 1e9, "the wall clock counts from 1970")
  end)

  it("advances with a sleep and never goes back", function()
    local t0, last = now(), now()
    for _ = 1, 1000 do
      local t = now()
      assert.is_true(t >= last)
      last = t
    end
    socket.sleep(0.05)
    local dt = now() - t0
    assert.is_true(dt >= 0.049, tostring(dt))
  end)
end)
