"""Lua scripts, registered once per connection (redis-py `register_script`).

Hashes travel as hex strings. Times are Redis server time in milliseconds, so producers and
workers on different machines agree on pending-mark expiry and heartbeat freshness.
"""

from __future__ import annotations

NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

_DROP_IF_ORPHAN = """
-- A node no worker stores lives only until its last pending mark expires (a request that is
-- routed but never stored, e.g. rejected, must not leave its nodes behind forever).
local function drop_if_orphan(node, now)
  local fields = redis.call('HGETALL', node)
  local latest = 0
  for i = 1, #fields, 2 do
    local f = fields[i]
    if string.sub(f, 1, 2) == 'w:' then return end
    if string.sub(f, 1, 2) == 'p:' then latest = math.max(latest, tonumber(fields[i + 1])) end
  end
  if latest > now then
    redis.call('PEXPIREAT', node, latest)
  else
    redis.call('DEL', node)
  end
end
"""

STORE = """
-- KEYS[1] = the worker's block set (kvq:worker:<w>:blocks)
-- ARGV[1] = key prefix, ARGV[2] = worker, ARGV[3] = parent hash of the first block ('' if none)
-- ARGV[4..] = stored block hashes, parent first
local prefix, worker, parent = ARGV[1], ARGV[2], ARGV[3]
local stored, pending = 'w:' .. worker, 'p:' .. worker
for i = 4, #ARGV do
  local node = prefix .. 'node:' .. ARGV[i]
  redis.call('HSET', node, 'parent', parent, stored, '1')
  redis.call('HDEL', node, pending)
  redis.call('PERSIST', node)
  redis.call('SADD', KEYS[1], ARGV[i])
  parent = ARGV[i]
end
return #ARGV - 3
"""

REMOVE = (
    """
-- KEYS[1] = the worker's block set (kvq:worker:<w>:blocks)
-- ARGV[1] = key prefix, ARGV[2] = worker, ARGV[3..] = removed block hashes
"""
    + NOW_MS
    + _DROP_IF_ORPHAN
    + """
local prefix, stored = ARGV[1], 'w:' .. ARGV[2]
for i = 3, #ARGV do
  local node = prefix .. 'node:' .. ARGV[i]
  redis.call('HDEL', node, stored)
  redis.call('SREM', KEYS[1], ARGV[i])
  drop_if_orphan(node, now)
end
return #ARGV - 2
"""
)

_CLEAR_WORKER = """
-- clear_worker(prefix, worker, blocks_key, now): drop every block the worker caches from the
-- tree (its `w:` fields) and forget its block set; returns how many blocks it held.
local function clear_worker(prefix, worker, blocks_key, now)
  local stored = 'w:' .. worker
  local members = redis.call('SMEMBERS', blocks_key)
  for _, h in ipairs(members) do
    local node = prefix .. 'node:' .. h
    redis.call('HDEL', node, stored)
    drop_if_orphan(node, now)
  end
  redis.call('DEL', blocks_key)
  return #members
end
"""

_FORGET_PENDING = """
-- forget_pending(prefix, worker, pending_key, now): drop every pending mark of the worker.
local function forget_pending(prefix, worker, pending_key, now)
  local field = 'p:' .. worker
  for _, h in ipairs(redis.call('ZRANGE', pending_key, 0, -1)) do
    local node = prefix .. 'node:' .. h
    redis.call('HDEL', node, field)
    drop_if_orphan(node, now)
  end
  redis.call('DEL', pending_key)
end
"""

# Lua that defines `now`, `drop_if_orphan`, `clear_worker` and `forget_pending`: what a script
# that removes a worker from the tree needs (CLEAR, FORGET, and a dead worker's purge).
WORKER_TREE_FUNCTIONS = NOW_MS + _DROP_IF_ORPHAN + _CLEAR_WORKER + _FORGET_PENDING

CLEAR = (
    """
-- KEYS[1] = the worker's block set (kvq:worker:<w>:blocks)
-- ARGV[1] = key prefix, ARGV[2] = worker
-- The worker's pending marks stay: requests already routed to it will still store them.
"""
    + WORKER_TREE_FUNCTIONS
    + """
return clear_worker(ARGV[1], ARGV[2], KEYS[1], now)
"""
)

FORGET = (
    """
-- A worker that is gone: its cached blocks and its pending marks leave the tree.
-- KEYS[1] = the worker's block set, KEYS[2] = its pending marks (kvq:worker:<w>:pending)
-- ARGV[1] = key prefix, ARGV[2] = worker
"""
    + WORKER_TREE_FUNCTIONS
    + """
local held = clear_worker(ARGV[1], ARGV[2], KEYS[1], now)
forget_pending(ARGV[1], ARGV[2], KEYS[2], now)
return held
"""
)

MARK_PENDING = (
    """
-- KEYS[1] = the worker's pending marks (kvq:worker:<w>:pending: hash -> expiry), so that a
--           dead worker's marks can be found and purged; expired entries are trimmed here
-- ARGV[1] = key prefix, ARGV[2] = worker, ARGV[3] = TTL in ms, ARGV[4..] = block hashes
"""
    + NOW_MS
    + _DROP_IF_ORPHAN
    + """
local prefix, worker = ARGV[1], ARGV[2]
local expires = now + tonumber(ARGV[3])
for i = 4, #ARGV do
  local node = prefix .. 'node:' .. ARGV[i]
  redis.call('HSET', node, 'p:' .. worker, expires)
  redis.call('ZADD', KEYS[1], expires, ARGV[i])
  drop_if_orphan(node, now)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIREAT', KEYS[1], expires)
return expires
"""
)

_LEADING_RUN = """
-- leading_run(worker): how many of the request's n blocks the worker holds (stored, or pending
-- and not expired), found by binary search: caches are prefix-closed, so "holds block i" is
-- monotone along the chain; each probe is one HMGET of the stored and pending fields.
-- The request's hashes arrive as one argument, `chain`: hex, 64 characters each, concatenated
-- (sending and unpacking 512 separate arguments cost more than the search itself).
-- Needs `prefix`, `chain`, `n` and `now` in scope.
local function block_key(pos)
  return prefix .. 'node:' .. string.sub(chain, pos * 64 - 63, pos * 64)
end
local function holds(pos, worker)
  local v = redis.call('HMGET', block_key(pos), 'w:' .. worker, 'p:' .. worker)
  if v[1] then return true end
  return v[2] ~= false and tonumber(v[2]) > now
end
local function leading_run(worker)
  if n == 0 or not holds(1, worker) then return 0 end
  local lo, hi = 1, n
  while lo < hi do
    local mid = math.floor((lo + hi + 1) / 2)
    if holds(mid, worker) then lo = mid else hi = mid - 1 end
  end
  return lo
end
"""

ROUTE_VIEW = (
    """
-- The router's whole read in one round trip.
-- KEYS[1] = live workers (zset: worker -> last heartbeat, ms)
-- KEYS[2] = the shared round-robin counter (INCR'd when ARGV[3] == '1')
-- KEYS[3..] = state hashes (field = worker), returned whole
-- ARGV[1] = key prefix, ARGV[2] = heartbeat TTL in ms, ARGV[3] = '1' to take a ticket
-- ARGV[4] = the request's block hashes in chain order, hex, concatenated ('' for none)
-- Returns {live workers, their match lengths, ticket, state hash 1 (flat), state hash 2, ...}.
"""
    + NOW_MS
    + """
local prefix, chain = ARGV[1], ARGV[4]
local n = math.floor(#chain / 64)
"""
    + _LEADING_RUN
    + """
local live = redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[2]), '+inf')
local ticket = 0
if ARGV[3] == '1' then ticket = redis.call('INCR', KEYS[2]) end
local matches = {}
for i, worker in ipairs(live) do matches[i] = leading_run(worker) end
local out = {live, matches, ticket}
for k = 3, #KEYS do out[#out + 1] = redis.call('HGETALL', KEYS[k]) end
return out
"""
)

MATCH = (
    """
-- `PrefixIndex.match` of the Redis backend: the match of every worker that holds the request's
-- first block (stored, or pending and not expired), whether or not it is registered as live.
-- ARGV[1] = key prefix
-- ARGV[2] = the request's block hashes in chain order, hex, concatenated ('' for none)
-- Returns {workers, their match lengths}, workers with a match of 0 left out.
"""
    + NOW_MS
    + """
local prefix, chain = ARGV[1], ARGV[2]
local n = math.floor(#chain / 64)
"""
    + _LEADING_RUN
    + """
local workers, matches, seen = {}, {}, {}
if n > 0 then
  for _, field in ipairs(redis.call('HKEYS', block_key(1))) do
    local kind, worker = string.sub(field, 1, 2), string.sub(field, 3)
    if (kind == 'w:' or kind == 'p:') and not seen[worker] then
      seen[worker] = true
      local length = leading_run(worker)
      if length > 0 then
        workers[#workers + 1] = worker
        matches[#matches + 1] = length
      end
    end
  end
end
return {workers, matches}
"""
)
