"""Lua scripts of the live pipeline: a run's data (claiming a run id, appending a request's one
result) and a KV worker's RQ lists (taking queued jobs, giving back the untouched ones)."""

from __future__ import annotations

CLAIM_RUN = """
-- A producer claims a run id before it writes anything else of the run.
-- KEYS[1] = the run's metadata hash, KEYS[2] = its results stream
-- ARGV[1] = owner (JSON: who claims it), ARGV[2] = run TTL in ms,
-- ARGV[3..] = metadata field, value, field, value, ...
-- Returns nil when claimed, else the owner of the run that already uses the id.
if redis.call('EXISTS', KEYS[2]) == 1 then return 'an earlier run (its results exist)' end
if redis.call('HSETNX', KEYS[1], 'owner', ARGV[1]) == 0 then
  return redis.call('HGET', KEYS[1], 'owner')
end
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return false
"""

APPEND_RESULT = """
-- A request's result: the first one wins, later ones are dropped.
-- KEYS[1] = the run's results stream, KEYS[2] = the run's reported request ids (set),
-- KEYS[3] = the run's metadata hash
-- ARGV[1] = request id, ARGV[2] = the result (JSON), ARGV[3] = stream cap in entries,
-- ARGV[4] = run TTL in ms: the run's data expires that long after its last result
-- Returns 1 if the result was appended, 0 if the request already had one.
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'result', ARGV[2])
for k = 1, 3 do redis.call('PEXPIRE', KEYS[k], ARGV[4]) end
return 1
"""

TAKE_QUEUED = """
-- A batched KV worker takes every job queued for it at a step boundary: each id moves to the
-- queue's intermediate list, as RQ's dequeue moves one (LMOVE), and its job hash comes back in
-- the same round trip. (Job keys are built here from the ids: RQ's own scripts do the same.)
-- KEYS[1] = the RQ queue (rq:queue:<worker>), KEYS[2] = its intermediate list
-- ARGV[1] = RQ's job key prefix ('rq:job:'), ARGV[2] = take at most this many,
-- ARGV[3] = '1' to answer with every job of the intermediate list, not only those moved now
-- (after a lost reply, what was moved then is only there)
-- Returns {job id, {its hash, flat}, job id, {...}, ...}; a job whose hash is gone has {}.
local taken = {}
for i = 1, tonumber(ARGV[2]) do
  local id = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
  if not id then break end
  taken[#taken + 1] = id
end
if ARGV[3] == '1' then taken = redis.call('LRANGE', KEYS[2], 0, -1) end
local out = {}
for _, id in ipairs(taken) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGETALL', ARGV[1] .. id)
end
return out
"""

REQUEUE_TAKEN = """
-- A worker process starts: jobs an earlier process of its name took off the queue but never
-- started (left on the intermediate list) go back to the head of the queue, in their order.
-- KEYS[1] = the RQ queue, KEYS[2] = its intermediate list
-- Returns how many moved.
local moved = 0
while redis.call('LMOVE', KEYS[2], KEYS[1], 'RIGHT', 'LEFT') do moved = moved + 1 end
return moved
"""
