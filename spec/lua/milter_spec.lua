-- lua/milter.lua: the verdict constructors only fill in `action`.
local milter = require "milter"

describe("milter constructors", function()
  for _, action in ipairs({ "continue", "accept", "reject", "tempfail", "discard", "skip" }) do
    it(action .. " fills in action and keeps the other fields", function()
      local t = { reason = "x" }
      local v = milter[action](t)
      assert.are.equal(t, v)
      assert.are.same({ action = action, reason = "x" }, v)
    end)

    it(action .. " with no argument is a bare verdict", function()
      assert.are.same({ action = action }, milter[action]())
    end)
  end

  it("refuses a non-table argument, pointing at the caller", function()
    local ok, err = pcall(milter.reject, "no")
    assert.is_false(ok)
    assert.matches("milter.reject expects a table", err)
  end)
end)

describe("milter.null", function()
  it("is one value, named by tostring, and read-only", function()
    assert.are.equal(milter.null, require("milter").null)
    assert.are.equal("milter.null", tostring(milter.null))
    assert.is_nil(next(milter.null))
    assert.has_error(function() milter.null.x = 1 end, "milter.null is read-only")
    assert.are.equal("milter.null", getmetatable(milter.null))
  end)
end)
