"""Lua scripts of worker membership and outstanding-job accounting (`kvqueue.routing.membership`).

A worker's outstanding load (`kvq:load`, `kvq:load:tokens`, `kvq:load:work`) is the sum of
the load records in its jobs hash (`kvq:worker:<w>:jobs`, job id -> JSON) that belong to its
current generation. Each record is added once (when the job is routed, or adopted when it
starts) and taken away once (`RELEASE_JOB` deletes it first and subtracts only what it
deleted), so retries are harmless and the counters cannot drift; they are clamped at 0 as
well. A record: ``{"run", "req", "strategy", "tokens", "work", "gen", "started"}``.

Registrations are numbered per worker name (`kvq:worker:<w>:generation`, INCR): a process
acts only while the generation it registered is the current one, so nothing an old process
(dead, or declared dead) still does touches the counters of its successor. Times are Redis
server time in ms, like the index scripts.
"""

from __future__ import annotations

from kvqueue.routing.scripts import NOW_MS, WORKER_TREE_FUNCTIONS

_COUNTERS = """
-- count(worker, record, sign): add (sign 1) or take away (sign -1) a record's load; never
-- leaves a counter below 0. Needs KEYS[load], KEYS[tokens], KEYS[work] as `load_keys`.
local function bump(key, field, amount, float)
  local value
  if float then
    value = tonumber(redis.call('HINCRBYFLOAT', key, field, amount))
  else
    value = tonumber(redis.call('HINCRBY', key, field, amount))
  end
  if value < 0 then redis.call('HSET', key, field, 0) end
end
local function count(worker, record, sign)
  bump(load_keys[1], worker, sign, false)
  bump(load_keys[2], worker, sign * record.tokens, false)
  bump(load_keys[3], worker, sign * record.work, true)
end
"""

RECORD_JOB = """
-- A routed job's load record, stamped with the worker's current generation.
-- KEYS[1] = the worker's generation, KEYS[2] = its jobs hash
-- ARGV[1] = job id, ARGV[2] = the record (JSON) without `gen` and `started`
local record = cjson.decode(ARGV[2])
record.gen = tonumber(redis.call('GET', KEYS[1]) or '0')
record.started = 0
redis.call('HSET', KEYS[2], ARGV[1], cjson.encode(record))
return record.gen
"""

START_JOB = (
    """
-- A worker process is about to serve a job.
-- KEYS[1] = the worker's generation, KEYS[2] = its jobs hash,
-- KEYS[3..5] = load, load:tokens, load:work
-- ARGV[1] = worker, ARGV[2] = job id, ARGV[3] = the serving process's generation,
-- ARGV[4] = a record (JSON) to adopt when the job has none (e.g. Redis lost it)
-- Returns 'lost' (no generation: Redis lost the registration), 'superseded' (a newer process
-- registered the name), 'adopted' (counted now: it had no record, or one of an older
-- generation) or 'counted' (its record was already counted for this generation).
local load_keys = {KEYS[3], KEYS[4], KEYS[5]}
"""
    + _COUNTERS
    + """
local current = redis.call('GET', KEYS[1])
if not current then return 'lost' end
if current ~= ARGV[3] then return 'superseded' end
local raw = redis.call('HGET', KEYS[2], ARGV[2])
local record = raw and cjson.decode(raw)
local status = 'counted'
if not record or tostring(record.gen) ~= current then
  record = record or cjson.decode(ARGV[4])
  record.gen = tonumber(current)
  count(ARGV[1], record, 1)
  status = 'adopted'
end
record.started = 1
redis.call('HSET', KEYS[2], ARGV[2], cjson.encode(record))
return status
"""
)

RELEASE_JOB = (
    """
-- A job ended (or will never run): take its load away, once.
-- KEYS[1] = the worker's generation, KEYS[2] = its jobs hash,
-- KEYS[3..6] = load, load:tokens, load:work, load:since, KEYS[7] = usage,
-- KEYS[8] = output statistics
-- ARGV[1] = worker, ARGV[2] = job id ('' for load committed without a record: then ARGV[3]
-- and ARGV[4] say what it added), ARGV[3] = tokens, ARGV[4] = work ms,
-- ARGV[5] = cache blocks in use ('' if not reported), ARGV[6] = output tokens ('' if none),
-- ARGV[7] = the caller's wall clock in ms (load:since is kept in the routers' clock)
-- Returns 1 if load was taken away now, 0 if it already had been (or belonged to a
-- generation that is gone).
local load_keys = {KEYS[3], KEYS[4], KEYS[5]}
"""
    + _COUNTERS
    + """
local worker = ARGV[1]
local record = {tokens = tonumber(ARGV[3]), work = tonumber(ARGV[4])}
local release = ARGV[2] == ''
if not release then
  local raw = redis.call('HGET', KEYS[2], ARGV[2])
  if raw then
    redis.call('HDEL', KEYS[2], ARGV[2])
    record = cjson.decode(raw)
    release = tostring(record.gen) == (redis.call('GET', KEYS[1]) or '0')
  end
end
if release then
  count(worker, record, -1)
  redis.call('HSET', KEYS[6], worker, ARGV[7])
end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[7], worker, ARGV[5]) end
if ARGV[6] ~= '' then
  redis.call('HINCRBY', KEYS[8], 'output_tokens', ARGV[6])
  redis.call('HINCRBY', KEYS[8], 'completed', 1)
end
return release and 1 or 0
"""
)

REGISTER = (
    """
-- A process takes the worker's name: a new generation, live now, with an empty cache.
-- KEYS[1] = the worker's generation, KEYS[2] = live workers, KEYS[3] = its jobs hash,
-- KEYS[4..7] = load, load:tokens, load:work, load:since, KEYS[8] = capacity, KEYS[9] = usage,
-- KEYS[10] = engine signals (an earlier process's are dropped)
-- ARGV[1] = worker, ARGV[2] = capacity in blocks, ARGV[3] = the caller's wall clock in ms
-- Jobs still queued for an earlier generation are this one's now, counted afresh (so the
-- counters equal the records again); jobs an earlier generation had started are removed and
-- returned: their process is gone and they end as failed.
-- Returns {generation, {job id, record, ...} of the started jobs}.
local load_keys = {KEYS[4], KEYS[5], KEYS[6]}
"""
    + NOW_MS
    + _COUNTERS
    + """
local worker = ARGV[1]
local gen = redis.call('INCR', KEYS[1])
redis.call('ZADD', KEYS[2], now, worker)
redis.call('HSET', KEYS[8], worker, ARGV[2])
redis.call('HSET', KEYS[9], worker, 0)
for _, k in ipairs({4, 5, 6, 7, 10}) do redis.call('HDEL', KEYS[k], worker) end
local started, queued = {}, 0
local entries = redis.call('HGETALL', KEYS[3])
for i = 1, #entries, 2 do
  local record = cjson.decode(entries[i + 1])
  if record.started == 1 then
    started[#started + 1] = entries[i]
    started[#started + 1] = entries[i + 1]
    redis.call('HDEL', KEYS[3], entries[i])
  else
    record.gen = gen
    redis.call('HSET', KEYS[3], entries[i], cjson.encode(record))
    count(worker, record, 1)
    queued = queued + 1
  end
end
if queued > 0 then redis.call('HSET', KEYS[7], worker, ARGV[3]) end
return {gen, started}
"""
)

HEARTBEAT = (
    """
-- KEYS[1] = the worker's generation, KEYS[2] = live workers
-- ARGV[1] = worker, ARGV[2] = the heartbeating process's generation
-- Returns 'ok' (heartbeat recorded), 'lost' (Redis lost the registration: restarted empty or
-- flushed), 'superseded' (a newer process registered the name) or 'reaped' (declared dead).
"""
    + NOW_MS
    + """
local current = redis.call('GET', KEYS[1])
if not current then return 'lost' end
if current ~= ARGV[2] then return 'superseded' end
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 'reaped' end
redis.call('ZADD', KEYS[2], now, ARGV[1])
return 'ok'
"""
)

LIVE_WORKERS = (
    """
-- KEYS[1] = live workers; ARGV[1] = heartbeat TTL in ms, ARGV[2] = '1' for the live ones
-- (heartbeat within the TTL), '0' for the expired ones.
"""
    + NOW_MS
    + """
local cutoff = now - tonumber(ARGV[1])
if ARGV[2] == '1' then return redis.call('ZRANGEBYSCORE', KEYS[1], cutoff, '+inf') end
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. cutoff)
"""
)

REAP = (
    """
-- Claim a worker's death, once: drop it from the live set and from the tree (cached blocks
-- and pending marks) and the approximate index (what was routed to it), zero its load, and
-- hand over its outstanding jobs.
-- KEYS[1] = live workers, KEYS[2] = the worker's generation, KEYS[3] = its jobs hash,
-- KEYS[4] = the tree's slots (kvq:slots), KEYS[5] = its pending slots (kvq:slots:pending),
-- KEYS[6..9] = load, load:tokens, load:work, load:since, KEYS[10] = usage,
-- KEYS[11] = its routed blocks (approximate index), KEYS[12] = engine signals
-- ARGV[1] = key prefix, ARGV[2] = worker, ARGV[3] = heartbeat TTL in ms,
-- ARGV[4] = a generation to claim whatever its heartbeat (a worker stopping hands itself
--           over), or '' to claim only an expired heartbeat
-- Returns nil when there is nothing to claim, else {generation, {job id, record, ...}}.
local prefix, worker = ARGV[1], ARGV[2]
"""
    + WORKER_TREE_FUNCTIONS
    + """
local gen = redis.call('GET', KEYS[2]) or '0'
if ARGV[4] ~= '' then
  if gen ~= ARGV[4] then return false end
else
  local score = redis.call('ZSCORE', KEYS[1], worker)
  if not score or tonumber(score) >= now - tonumber(ARGV[3]) then return false end
end
redis.call('ZREM', KEYS[1], worker)
local jobs = redis.call('HGETALL', KEYS[3])
redis.call('DEL', KEYS[3])
forget_pending(worker)
clear_worker(worker, now)
for _, k in ipairs({6, 7, 8, 9, 10, 12}) do redis.call('HDEL', KEYS[k], worker) end
redis.call('DEL', KEYS[11])
return {gen, jobs}
"""
)
