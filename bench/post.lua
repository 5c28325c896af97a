-- POST bodies for wrk (bench/wrk.py), each event with a messageId of its own, so that the null
-- upstream counts distinct events delivered, not requests. A counter per wrk thread, the
-- thread's number in the low bits: "b<run>-<seq>" is unique within a run.
-- Arguments after `--`: run id, events per request (0: one bare event, else a /v1/batch body),
-- write key, the event's JSON up to its messageId value, and from after it (where
-- @MESSAGE_ID@ marks a second place for the id: events alike but for it would be twins).

local threads = 0

function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end

local counter = 0

function init(args)
  run = args[1]
  per = tonumber(args[2])
  head = args[4]
  prefix = "b" .. run .. "-"
  middle, tail = args[5]:match("^(.-)@MESSAGE_ID@(.*)$")
  headers = {["Content-Type"] = "application/json", ["X-Write-Key"] = args[3]}
  tid = tid or 0
end

local function event()
  counter = counter + 1
  local id = prefix .. string.format("%d", counter * 16 + tid)
  return head .. id .. middle .. id .. tail
end

function request()
  if per == 0 then
    return wrk.format("POST", nil, headers, event())
  end
  local events = {}
  for i = 1, per do
    events[i] = event()
  end
  return wrk.format("POST", nil, headers, '{"batch":[' .. table.concat(events, ",") .. ']}')
end
