--- The Lua half of the luamilter API: verdict constructors.
--
-- A verdict is a plain table; each constructor only fills in `action`, so
-- handlers can be unit-tested without the daemon. The server validates every
-- verdict after the handler returns (see README, "Verdicts").
--
--   return milter.reject{ code = 550, xcode = "5.7.1", reason = "no" }
local M = {}

M._VERSION = "luamilter 0.1.0"

local function constructor(action)
  return function(t)
    if t == nil then
      t = {}
    elseif type(t) ~= "table" then
      error(("milter.%s expects a table or nothing, got %s"):format(action, type(t)), 2)
    end
    t.action = action
    return t
  end
end

M.continue = constructor("continue")
M.accept = constructor("accept")
M.reject = constructor("reject")
M.tempfail = constructor("tempfail")
M.discard = constructor("discard")
M.skip = constructor("skip")

-- What a nil reply from Redis becomes (a list keeps no holes): one value,
-- compared with ==, which C pushes too.
M.null = setmetatable({}, {
  __tostring = function() return "milter.null" end,
  __newindex = function() error("milter.null is read-only", 2) end,
  __metatable = "milter.null",
})

return M
