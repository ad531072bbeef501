"""Lua scripts of a run's data: claiming a run id, and appending a request's one result."""

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
