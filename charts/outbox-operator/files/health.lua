-- Argo CD health check for OutboxRelay (outbox.dev/v1alpha1), from its Ready
-- condition, the condition's reason and observedGeneration.
--
--   Progressing  no status yet; the operator has not reconciled the current
--                generation; the worker is rolling out; a deletion drains
--   Suspended    spec.suspend: the slot keeps new events, none are lost
--   Healthy      events flow (a lag warning is in the message)
--   Degraded     anything else that keeps events from moving: the message is the
--                operator's, naming the cause and what to do
local hs = {}

-- Reasons under which a not-ready relay is still getting somewhere on its own.
local progressing = {
  WorkerProgressing = true,
  Draining = true,
  NotReady = true,
}

local function ready_condition(status)
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == "Ready" then
      return c
    end
  end
  return nil
end

local ready = ready_condition(obj.status)
if ready == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to report the relay's status"
  return hs
end

local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and (ready.observedGeneration == nil or ready.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to reconcile generation " .. tostring(generation)
  return hs
end

local reason = ready.reason or ""
local message = ready.message or ""
if message == "" then
  message = reason
end

if ready.status == "True" then
  if reason == "Suspended" then
    hs.status = "Suspended"
  else
    hs.status = "Healthy"
  end
elseif ready.status == "False" and not progressing[reason] then
  hs.status = "Degraded"
  message = reason .. ": " .. message
else
  -- Unknown, or False while the relay is still getting somewhere.
  hs.status = "Progressing"
end
hs.message = message
return hs
