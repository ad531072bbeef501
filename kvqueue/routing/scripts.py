"""Lua scripts, registered once per connection (redis-py `register_script`).

The tree's layout (`kvqueue.routing.redis_index` has the whole picture): a node per block,
``<prefix>n:<32 raw hash bytes>``, a hash whose fields are the *slots* of the workers that
cache the block (a decimal number each, value ``1``) and ``p<pending slot>`` = expiry of a
pending mark. A worker's slot lives in ``<prefix>slots`` (worker -> slot), the blocks stored
under a slot in ``<prefix>slots:blocks`` (slot -> count), its pending slot in
``<prefix>slots:pending`` (worker -> slot). Clearing or forgetting a worker retires its slot,
forgetting it retires its pending slot too: the fields under a retired slot are invisible to
every reader at once and are swept from the nodes a few hundred keys at a time (`sweep_step`)
by the next writes.

Requests' hashes travel as one argument, the raw 32-byte hashes concatenated. Times are Redis
server time in milliseconds, so producers and workers on different machines agree on
pending-mark expiry and heartbeat freshness.
"""

from __future__ import annotations

HASH_BYTES = 32  # SHA-256 (kvqueue.gpu.hashing); every script cuts chains at this width
SWEEP_KEYS = 200  # keys a write visits per sweep step while a retired slot awaits a sweep

NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

_LAYOUT = """
-- The tree's keys and slots. Needs `prefix` in scope.
local slots_key, blocks_key = prefix .. 'slots', prefix .. 'slots:blocks'
local next_key, cursor_key = prefix .. 'slots:next', prefix .. 'slots:cursor'
local dead_key, sweeping_key = prefix .. 'slots:dead', prefix .. 'slots:sweeping'
local pending_slots_key = prefix .. 'slots:pending'
local function node_key(h) return prefix .. 'n:' .. h end
local function chain_hash(chain, pos) return string.sub(chain, pos * 32 - 31, pos * 32) end
local function slot_of(worker) return redis.call('HGET', slots_key, worker) end
local function slot_for(worker)
  local slot = slot_of(worker)
  if slot then return slot end
  slot = tostring(redis.call('INCR', next_key))
  redis.call('HSET', slots_key, worker, slot)
  redis.call('HSET', blocks_key, slot, 0)
  return slot
end
-- A pending slot is drawn from the same counter; its field in a node is 'p' .. slot, and the
-- retired-slot sets hold that field name, so one sweep removes stored and pending fields alike.
local function pending_field_of(worker)
  local slot = redis.call('HGET', pending_slots_key, worker)
  return slot and ('p' .. slot) or nil
end
local function pending_field_for(worker)
  local field = pending_field_of(worker)
  if field then return field end
  local slot = tostring(redis.call('INCR', next_key))
  redis.call('HSET', pending_slots_key, worker, slot)
  return 'p' .. slot
end
local function is_pending_field(f) return string.byte(f, 1) == 112 end  -- 'p'
"""

_DROP_IF_ORPHAN = """
-- A node no slot stores lives only until its last pending mark expires (a request that is
-- routed but never stored, e.g. rejected, must not leave its nodes behind forever).
local function drop_if_orphan(node, now)
  local fields = redis.call('HGETALL', node)
  local latest = 0
  for i = 1, #fields, 2 do
    if not is_pending_field(fields[i]) then return end
    latest = math.max(latest, tonumber(fields[i + 1]))
  end
  if latest > now then
    redis.call('PEXPIREAT', node, latest)
  else
    redis.call('DEL', node)
  end
end
"""

_SWEEP = """
-- sweep_step(now): one step of the pass that removes retired slots' fields from the nodes.
-- A pass takes the retired slots of its start (slots:dead into slots:sweeping) and SCANs every
-- node key once, SWEEP_KEYS keys a step; a slot retired meanwhile waits for the next pass.
-- Slots are never reused, so a retired slot gains no field after it is retired.
local node_pattern = string.gsub(prefix, '[%*%?%[%]\\\\]', '\\\\%0') .. 'n:*'
local function sweep_step(now)
  local cursor = redis.call('GET', cursor_key) or '0'
  if cursor == '0' then
    if redis.call('EXISTS', dead_key) == 0 then return end
    redis.call('SUNIONSTORE', sweeping_key, sweeping_key, dead_key)  -- keeps any left over
    redis.call('DEL', dead_key)
  end
  local reply = redis.call('SCAN', cursor, 'MATCH', node_pattern, 'COUNT', SWEEP_KEYS)
  for _, node in ipairs(reply[2]) do
    local swept = false
    for _, f in ipairs(redis.call('HKEYS', node)) do
      if redis.call('SISMEMBER', sweeping_key, f) == 1 then
        redis.call('HDEL', node, f)
        swept = true
      end
    end
    if swept then drop_if_orphan(node, now) end
  end
  redis.call('SET', cursor_key, reply[1])
  if reply[1] == '0' then redis.call('DEL', sweeping_key) end
end
"""

_HEADER = f"""
local SWEEP_KEYS = {SWEEP_KEYS}
"""

# Lua that defines the layout helpers, `drop_if_orphan` and `sweep_step`; needs `prefix`.
_TREE = _HEADER + _LAYOUT + _DROP_IF_ORPHAN + _SWEEP

STORE = (
    """
-- ARGV[1] = key prefix, ARGV[2] = worker, ARGV[3] = stored block hashes, parent first, raw,
-- concatenated. Stored blocks take the worker's slot (a new one if it has none) and end the
-- worker's pending marks on them. Returns how many blocks were new under the slot.
"""
    + NOW_MS
    + """
local prefix, worker, chain = ARGV[1], ARGV[2], ARGV[3]
"""
    + _TREE
    + """
local slot, pending = slot_for(worker), pending_field_of(worker)
local added = 0
for pos = 1, math.floor(#chain / 32) do
  local node = node_key(chain_hash(chain, pos))
  added = added + redis.call('HSET', node, slot, 1)
  if pending then redis.call('HDEL', node, pending) end
  redis.call('PERSIST', node)
end
if added > 0 then redis.call('HINCRBY', blocks_key, slot, added) end
sweep_step(now)
return added
"""
)

REMOVE = (
    """
-- ARGV[1] = key prefix, ARGV[2] = worker, ARGV[3] = removed block hashes, raw, concatenated
-- Returns how many of them the worker's slot held.
"""
    + NOW_MS
    + """
local prefix, worker, chain = ARGV[1], ARGV[2], ARGV[3]
"""
    + _TREE
    + """
local slot, removed = slot_of(worker), 0
if slot then
  for pos = 1, math.floor(#chain / 32) do
    local node = node_key(chain_hash(chain, pos))
    if redis.call('HDEL', node, slot) == 1 then
      removed = removed + 1
      drop_if_orphan(node, now)
    end
  end
  if removed > 0 then redis.call('HINCRBY', blocks_key, slot, -removed) end
end
sweep_step(now)
return removed
"""
)

_WORKER_EXIT = """
-- clear_worker(worker, now): retire the worker's slot (its cached blocks leave the tree for
-- every reader at once; the sweep removes the fields); returns how many blocks it held.
local function clear_worker(worker, now)
  local slot, held = slot_of(worker), 0
  if slot then
    held = tonumber(redis.call('HGET', blocks_key, slot)) or 0
    redis.call('HDEL', slots_key, worker)
    redis.call('HDEL', blocks_key, slot)
    redis.call('SADD', dead_key, slot)
  end
  sweep_step(now)
  return held
end
-- forget_pending(worker): retire the worker's pending slot: every pending mark of the worker
-- is invisible to every reader at once; the sweep removes the fields (call it before
-- `clear_worker`, whose sweep step then counts it). A later mark takes a new pending slot.
local function forget_pending(worker)
  local field = pending_field_of(worker)
  if not field then return end
  redis.call('HDEL', pending_slots_key, worker)
  redis.call('SADD', dead_key, field)
end
"""

# Lua that defines `now`, the layout helpers, `clear_worker` and `forget_pending`: what a
# script that removes a worker from the tree needs (CLEAR, FORGET, and a dead worker's purge).
# Needs `prefix` in scope before it.
WORKER_TREE_FUNCTIONS = NOW_MS + _TREE + _WORKER_EXIT

CLEAR = (
    """
-- ARGV[1] = key prefix, ARGV[2] = worker
-- The worker's pending marks stay: requests already routed to it will still store them.
local prefix = ARGV[1]
"""
    + WORKER_TREE_FUNCTIONS
    + """
return clear_worker(ARGV[2], now)
"""
)

FORGET = (
    """
-- A worker that is gone: its cached blocks and its pending marks leave the tree (both its
-- slots retire). ARGV[1] = key prefix, ARGV[2] = worker
local prefix = ARGV[1]
"""
    + WORKER_TREE_FUNCTIONS
    + """
forget_pending(ARGV[2])
return clear_worker(ARGV[2], now)
"""
)

SWEEP = (
    """
-- Up to ARGV[2] sweep steps (see sweep_step). ARGV[1] = key prefix.
-- Returns 1 when no retired slot awaits a sweep any more, else 0.
local prefix = ARGV[1]
"""
    + NOW_MS
    + _TREE
    + """
for _ = 1, tonumber(ARGV[2]) do
  if redis.call('EXISTS', dead_key, sweeping_key) == 0 then return 1 end
  sweep_step(now)
end
return redis.call('EXISTS', dead_key, sweeping_key) == 0 and 1 or 0
"""
)

MARK_PENDING = (
    """
-- Each block's node gets the field of the worker's pending slot (a new one if it has none),
-- value = expiry (server ms). Returns the expiry.
-- ARGV[1] = key prefix, ARGV[2] = worker, ARGV[3] = TTL in ms,
-- ARGV[4] = block hashes, raw, concatenated
"""
    + NOW_MS
    + """
local prefix, worker, chain = ARGV[1], ARGV[2], ARGV[4]
"""
    + _TREE
    + """
local expires = now + tonumber(ARGV[3])
local field = pending_field_for(worker)
for pos = 1, math.floor(#chain / 32) do
  local node = node_key(chain_hash(chain, pos))
  redis.call('HSET', node, field, expires)
  drop_if_orphan(node, now)
end
return expires
"""
)

_LEADING_RUN = """
-- leading_run(worker): how many of the request's n blocks the worker holds (stored under its
-- slot, or pending under its pending slot and not expired), found by binary search: caches
-- are prefix-closed, so "holds block i" is monotone along the chain; each probe is one HMGET.
-- The same positions as `InMemoryIndex.match` probes. Needs `chain`, `n` and `now` in scope.
local function holds(pos, slot, pending)
  local node = node_key(chain_hash(chain, pos))
  local stored, expires
  if slot and pending then
    local v = redis.call('HMGET', node, slot, pending)
    stored, expires = v[1], v[2]
  elseif slot then
    stored = redis.call('HGET', node, slot)
  else
    expires = redis.call('HGET', node, pending)
  end
  if stored then return true end
  return expires ~= false and expires ~= nil and tonumber(expires) > now
end
local function leading_run(worker)
  local slot, pending = slot_of(worker), pending_field_of(worker)
  if n == 0 or not (slot or pending) or not holds(1, slot, pending) then return 0 end
  local lo, hi = 1, n
  while lo < hi do
    local mid = math.floor((lo + hi + 1) / 2)
    if holds(mid, slot, pending) then lo = mid else hi = mid - 1 end
  end
  return lo
end
"""

_JOINT_SEARCH = """
-- joint_matches(slots, pendings): every worker's match at once (slots[i] and pendings[i]: worker
-- i's slot and pending-slot field, false if it has none). Worker i's match lies in
-- [lo[i], hi[i]]: it holds blocks 1..lo[i] and none past hi[i]. One HGETALL of the node at a
-- position p answers "holds p?" for every worker, so each probe narrows every interval that
-- contains p. Block 1 first (resolving every worker that lacks it, as a per-worker search
-- would), then the midpoint of the widest open interval, until none is open: about log2(n)
-- probes per distinct match instead of per worker (bench/bench_router.py counts both). On
-- prefix-closed holdings each result equals a walk; on a gap, it is a held boundary (block
-- L held, L+1 not), and for a single worker the positions are those of `leading_run`.
-- Needs `chain`, `n` and `now` in scope.
local function joint_matches(slots, pendings)
  local num, lo, hi = #pendings, {}, {}
  for i = 1, num do lo[i] = 0; hi[i] = n end
  if n == 0 then return lo end
  local owner, open = {}, {}  -- field -> worker index (its slot, its pending field); open ones
  for i = 1, num do
    if slots[i] then owner[slots[i]] = i end
    if pendings[i] then owner[pendings[i]] = i end
    open[i] = i
  end
  local node_start, pos, seen_at = prefix .. 'n:', 1, {}
  while pos do
    local f = redis.call('HGETALL', node_start .. chain_hash(chain, pos))
    for k = 1, #f, 2 do
      local i = owner[f[k]]
      if i and (not is_pending_field(f[k]) or tonumber(f[k + 1]) > now) then seen_at[i] = pos end
    end
    local probe, width, still = nil, 0, {}
    for _, i in ipairs(open) do
      if lo[i] < pos and pos <= hi[i] then
        if seen_at[i] == pos then lo[i] = pos else hi[i] = pos - 1 end
      end
      if hi[i] > lo[i] then
        still[#still + 1] = i
        if hi[i] - lo[i] > width then
          probe, width = math.floor((lo[i] + hi[i] + 1) / 2), hi[i] - lo[i]
        end
      end
    end
    pos, open = probe, still
  end
  return lo
end
"""

_ROUTED = """
-- The approximate index (kvqueue.routing.approximate in Redis): per worker a zset of the raw
-- block hashes routed to it, score = recency in ms since the clock's epoch, the blocks of one
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
-- ARGV[4] = the chain's hashes in order, raw, concatenated
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
for d = 1, math.floor(#chain / 32) do
  local h = string.sub(chain, d * 32 - 31, d * 32)
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
-- ARGV[4] = the request's block hashes in chain order, raw, concatenated ('' for none)
-- ARGV[5] = '' to match against the precise index (the workers' caches and pending marks),
--           else the approximate index's rules (see _ROUTED): forget what is due, then match
-- Returns {live workers, their match lengths, ticket, their index sizes (blocks), server ms,
--          state hash 1 (flat), state hash 2, ...}.
"""
    + NOW_MS
    + """
local prefix, chain = ARGV[1], ARGV[4]
local n = math.floor(#chain / 32)
"""
    + _TREE
    + _JOINT_SEARCH
    + _ROUTED
    + """
local live = redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[2]), '+inf')
local ticket = 0
if ARGV[3] == '1' then ticket = redis.call('INCR', KEYS[2]) end
local matches, sizes = {}, {}
if ARGV[5] == '' then
  -- Whole small hashes, not HMGET: a listpack answers each HMGET field by a scan.
  local slot_of_worker, blocks_of_slot, pending_of_worker = {}, {}, {}
  local flat = redis.call('HGETALL', slots_key)
  for k = 1, #flat, 2 do slot_of_worker[flat[k]] = flat[k + 1] end
  flat = redis.call('HGETALL', blocks_key)
  for k = 1, #flat, 2 do blocks_of_slot[flat[k]] = flat[k + 1] end
  flat = redis.call('HGETALL', pending_slots_key)
  for k = 1, #flat, 2 do pending_of_worker[flat[k]] = 'p' .. flat[k + 1] end
  local slots, pendings = {}, {}
  for i, worker in ipairs(live) do
    slots[i] = slot_of_worker[worker] or false
    pendings[i] = pending_of_worker[worker] or false
    sizes[i] = tonumber(blocks_of_slot[slots[i]]) or 0
  end
  matches = joint_matches(slots, pendings)
else
  local rules = parse_rules(ARGV[5])
  local t = clock_now()
  drop_expired(rules, live, t)
  sweep_if_due(rules, live, t)
  if rules.max and rules.max < n then n = rules.max end
  local function routed_holds(pos, worker)
    return redis.call('ZSCORE', routed_key(worker), chain_hash(chain, pos))
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
-- first block (stored under its current slot, or pending under its current pending slot and
-- not expired), whether or not it is registered as live.
-- ARGV[1] = key prefix
-- ARGV[2] = the request's block hashes in chain order, raw, concatenated ('' for none)
-- Returns {workers, their match lengths}, workers with a match of 0 left out.
"""
    + NOW_MS
    + """
local prefix, chain = ARGV[1], ARGV[2]
local n = math.floor(#chain / 32)
"""
    + _TREE
    + _LEADING_RUN
    + """
local workers, matches, seen, owner = {}, {}, {}, {}  -- owner: field -> worker
local flat = redis.call('HGETALL', slots_key)
for k = 1, #flat, 2 do owner[flat[k + 1]] = flat[k] end
flat = redis.call('HGETALL', pending_slots_key)
for k = 1, #flat, 2 do owner['p' .. flat[k + 1]] = flat[k] end
if n > 0 then
  for _, field in ipairs(redis.call('HKEYS', node_key(chain_hash(chain, 1)))) do
    local worker = owner[field]
    if worker and not seen[worker] then
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
