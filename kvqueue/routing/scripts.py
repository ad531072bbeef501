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

_ROUTED = """
-- The approximate index (kvqueue.routing.approximate in Redis): per worker a zset of the block
-- hashes routed to it, score = recency in ms since the clock's epoch, the blocks of one
-- recording ordered by depth in the fractional part (1e-6 ms per block); for caps over the
-- whole tree, the same entries as '<worker>|<hash>' in one zset. Forgetting, in this order:
-- entries older than the TTL; then, at every recording or (with a sweep interval) at the
-- first read or write past each multiple of it, the least recent entries over a cap, down to
-- prune_to × the cap. Lookups never refresh an entry.
-- Rules arrive as one argument: 'ttl|cap|scope|prune_to|sweep|order|max|walk|from_gpu'
-- (ms, blocks; '' = none). Needs `prefix` and `now` in scope.
local function parse_rules(text)
  local f = {}
  for part in string.gmatch(text .. '|', '([^|]*)|') do f[#f + 1] = part end
  return {ttl = tonumber(f[1]), cap = tonumber(f[2]), cluster = f[3] == 'cluster',
          prune = tonumber(f[4]) or 1, sweep = tonumber(f[5]), insertion = f[6] == 'insertion',
          max = tonumber(f[7]), walk = f[8] == '1', gpu = f[9] == '1'}
end
local function routed_key(worker) return prefix .. 'worker:' .. worker .. ':routed' end
local all_key, clock_key = prefix .. 'routed', prefix .. 'routed:clock'
local function clock_now()
  local epoch = tonumber(redis.call('HGET', clock_key, 'epoch'))
  if not epoch then
    epoch = now
    redis.call('HSET', clock_key, 'epoch', epoch)
  end
  return now - epoch
end
local function worker_cap(rules, worker)
  if rules.gpu then
    local blocks = tonumber(redis.call('HGET', prefix .. 'capacity', worker))
    if blocks and blocks > 0 then return blocks end
  end
  return rules.cap
end
local function drop_expired(rules, workers, t)
  if not rules.ttl then return end
  local cutoff = t - rules.ttl
  for _, worker in ipairs(workers) do
    redis.call('ZREMRANGEBYSCORE', routed_key(worker), '-inf', cutoff)
  end
  if rules.cluster then redis.call('ZREMRANGEBYSCORE', all_key, '-inf', cutoff) end
end
local function enforce_caps(rules, workers)
  if rules.cluster then
    local total = redis.call('ZCARD', all_key)
    if rules.cap and total > rules.cap then
      local target = math.floor(rules.cap * rules.prune)
      local popped = redis.call('ZPOPMIN', all_key, total - target)
      for i = 1, #popped, 2 do
        local entry = popped[i]
        local bar = string.find(entry, '|', 1, true)
        redis.call('ZREM', routed_key(string.sub(entry, 1, bar - 1)), string.sub(entry, bar + 1))
      end
    end
    return
  end
  for _, worker in ipairs(workers) do
    local cap = worker_cap(rules, worker)
    local size = redis.call('ZCARD', routed_key(worker))
    if cap and size > cap then
      redis.call('ZPOPMIN', routed_key(worker), size - math.floor(cap * rules.prune))
    end
  end
end
local function sweep_if_due(rules, workers, t)
  if not rules.sweep then return end
  local due = tonumber(redis.call('HGET', clock_key, 'sweep')) or rules.sweep
  if t < due then return end
  enforce_caps(rules, workers)
  due = due + rules.sweep * (1 + math.floor((t - due) / rules.sweep))
  redis.call('HSET', clock_key, 'sweep', due)
end
"""

RECORD_ROUTED = (
    """
-- The router sent a request to a worker: its chain joins the worker's approximate index.
-- ARGV[1] = key prefix, ARGV[2] = worker, ARGV[3] = rules (see _ROUTED),
-- ARGV[4] = the chain's hashes in order, hex, concatenated
-- Returns the worker's number of entries after forgetting.
"""
    + NOW_MS
    + """
local prefix, worker = ARGV[1], ARGV[2]
"""
    + _ROUTED
    + """
local rules, chain = parse_rules(ARGV[3]), ARGV[4]
local t = clock_now()
local workers = {worker}
drop_expired(rules, workers, t)
sweep_if_due(rules, workers, t)
local key = routed_key(worker)
for d = 1, math.floor(#chain / 64) do
  local h = string.sub(chain, d * 64 - 63, d * 64)
  local score = t - (d - 1) * 1e-6
  if rules.insertion then score = t + (d - 1) * 1e-6 end
  redis.call('ZADD', key, score, h)
  if rules.cluster then redis.call('ZADD', all_key, score, worker .. '|' .. h) end
end
if not rules.sweep then enforce_caps(rules, workers) end
return redis.call('ZCARD', key)
"""
)

ROUTE_VIEW = (
    """
-- The router's whole read in one round trip.
-- KEYS[1] = live workers (zset: worker -> last heartbeat, ms)
-- KEYS[2] = the shared round-robin counter (INCR'd when ARGV[3] == '1')
-- KEYS[3..] = state hashes (field = worker), returned whole
-- ARGV[1] = key prefix, ARGV[2] = heartbeat TTL in ms, ARGV[3] = '1' to take a ticket
-- ARGV[4] = the request's block hashes in chain order, hex, concatenated ('' for none)
-- ARGV[5] = '' to match against the precise index (the workers' caches and pending marks),
--           else the approximate index's rules (see _ROUTED): forget what is due, then match
-- Returns {live workers, their match lengths, ticket, their index sizes (blocks), server ms,
--          state hash 1 (flat), state hash 2, ...}.
"""
    + NOW_MS
    + """
local prefix, chain = ARGV[1], ARGV[4]
local n = math.floor(#chain / 64)
"""
    + _LEADING_RUN
    + _ROUTED
    + """
local live = redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[2]), '+inf')
local ticket = 0
if ARGV[3] == '1' then ticket = redis.call('INCR', KEYS[2]) end
local matches, sizes = {}, {}
if ARGV[5] == '' then
  for i, worker in ipairs(live) do
    matches[i] = leading_run(worker)
    sizes[i] = redis.call('SCARD', prefix .. 'worker:' .. worker .. ':blocks')
  end
else
  local rules = parse_rules(ARGV[5])
  local t = clock_now()
  drop_expired(rules, live, t)
  sweep_if_due(rules, live, t)
  if rules.max and rules.max < n then n = rules.max end
  local function routed_holds(pos, worker)
    return redis.call('ZSCORE', routed_key(worker), string.sub(chain, pos * 64 - 63, pos * 64))
  end
  for i, worker in ipairs(live) do
    matches[i] = 0
    sizes[i] = redis.call('ZCARD', routed_key(worker))
  end
  if rules.walk then
    -- llm-d: every worker holding block i scores one; stop at the first block nobody holds.
    for pos = 1, n do
      local any = false
      for i, worker in ipairs(live) do
        if routed_holds(pos, worker) then
          matches[i] = matches[i] + 1
          any = true
        end
      end
      if not any then break end
    end
  else
    for i, worker in ipairs(live) do
      if n > 0 and routed_holds(1, worker) then
        local lo, hi = 1, n
        while lo < hi do
          local mid = math.floor((lo + hi + 1) / 2)
          if routed_holds(mid, worker) then lo = mid else hi = mid - 1 end
        end
        matches[i] = lo
      end
    end
  end
end
local out = {live, matches, ticket, sizes, now}
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
