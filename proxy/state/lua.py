"""The Lua scripts `RedisState` runs: each is one atomic step on the server.

Expiry is measured on Redis's own clock (`TIME`), never on a replica's. Sets whose members
expire one by one (replicas, leases, host index) are sorted sets scored by the member's expiry
in ms; the key itself carries a TTL at least as long as its longest-lived member, so nothing
outlives the replicas that wrote it.
"""
from __future__ import annotations

_COMMON = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function extend(key, ttl_ms)
  if redis.call('PTTL', key) < ttl_ms then redis.call('PEXPIRE', key, ttl_ms) end
end
local function alive(zset, member, now)
  local score = redis.call('ZSCORE', zset, member)
  return score and tonumber(score) > now
end
"""

# KEYS: zset   ARGV: member, ttl_ms   (a heartbeat: the replica's or a host's index entry)
#   → 1 if the member was alive already, else 0
# ZADD first: Redis checks a script's writes against maxmemory only until its first write, so
# a heartbeat that began with the removal would pass on a Redis refusing every other write.
TOUCH = _COMMON + """
local now, ttl = now_ms(), tonumber(ARGV[2])
local was = alive(KEYS[1], ARGV[1], now)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
extend(KEYS[1], ttl)
if was then return 1 end
return 0
"""

# KEYS: zset   → members still alive
LIVE = _COMMON + """
return redis.call('ZRANGE', KEYS[1], '(' .. now_ms(), '+inf', 'BYSCORE')
"""

# KEYS: record, index   ARGV: name, json, ttl_ms
PUT_HOST = _COMMON + """
local now, ttl = now_ms(), tonumber(ARGV[3])
redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
extend(KEYS[2], ttl)
"""

# KEYS: lock, fence counter   ARGV: replica, ttl_ms, fence_ttl_ms   → token or nil
# SET NX PX is the single flight; the counter is seeded from the clock (in µs) when absent, so
# tokens keep increasing even after Redis lost its data or the idle counter expired.
ACQUIRE_LOCK = """
if not redis.call('SET', KEYS[1], '', 'NX', 'PX', ARGV[2]) then return false end
if redis.call('EXISTS', KEYS[2]) == 0 then
  local t = redis.call('TIME')
  redis.call('SET', KEYS[2], t[1] .. string.format('%06d', tonumber(t[2])))
end
local token = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
-- %d: Lua's own number formatting would write a 16-digit token as 1.76e+15
redis.call('SET', KEYS[1], string.format('%d', token) .. ':' .. ARGV[1], 'KEEPTTL')
return token
"""

# KEYS: lock   ARGV: holder ("token:replica"), ttl_ms   → 1 if this holder still had it
RENEW_LOCK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: lock   ARGV: holder   → 1 if this holder had it (and now nobody does)
RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""

# Reservations: a hash of "replica|key" → "bytes:expires_at_ms". An entry counts while it has
# not expired and its replica's heartbeat lives; others are deleted as they are met.
_LIVE_RESERVATIONS = _COMMON + """
local function live_total(res, replicas, skip_field)
  local now, total, skipped = now_ms(), 0, 0
  local entries = redis.call('HGETALL', res)
  for i = 1, #entries, 2 do
    local f, v = entries[i], entries[i + 1]
    local bytes, exp = string.match(v, '^(%d+):(%d+)$')
    local replica = string.match(f, '^([^|]*)|')
    if tonumber(exp) <= now or not alive(replicas, replica, now) then
      redis.call('HDEL', res, f)
    elseif f == skip_field then
      skipped = tonumber(bytes)
    else
      total = total + tonumber(bytes)
    end
  end
  return now, total, skipped
end
"""

# KEYS: reservations, replicas   ARGV: field, size_bytes, budget_bytes, ttl_ms, replica ('' for
#   any)   → {granted 0|1, live reserved bytes}, or {-1, 0} when the replica given is not alive
RESERVE = _LIVE_RESERVATIONS + """
if ARGV[5] ~= '' and not alive(KEYS[2], ARGV[5], now_ms()) then return {-1, 0} end
local size, budget, ttl = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local now, others, mine = live_total(KEYS[1], KEYS[2], ARGV[1])
if others + size > budget then return {0, others + mine} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. string.format('%d', now + ttl))
extend(KEYS[1], ttl)
return {1, others + size}
"""

# KEYS: reservations, replicas   → live reserved bytes
RESERVED = _LIVE_RESERVATIONS + """
local _, total = live_total(KEYS[1], KEYS[2], '')
return total
"""

# KEYS: n lease zsets, then the n models' wants, then replicas   ARGV: replica, ttl_ms, then
#   per lease '1' if no request holds it now (given up if another replica wants the model),
#   else '0'   → {indices (1-based) given up, the replicas wanting them, indices renewed though
#   wanted}. A want counts only while its replica's heartbeat lives (one that left wants none).
RENEW_LEASES = _COMMON + """
local now, ttl, n = now_ms(), tonumber(ARGV[2]), (#KEYS - 1) / 2
local given, by, wanted = {}, {}, {}
for i = 1, n do
  local key, want = KEYS[i], redis.call('GET', KEYS[n + i])
  if want and not alive(KEYS[#KEYS], want, now) then want = false end
  if want and want ~= ARGV[1] and ARGV[2 + i] == '1' then
    redis.call('ZREM', key, ARGV[1])
    given[#given + 1] = i
    by[#by + 1] = want
  else
    if want and want ~= ARGV[1] then wanted[#wanted + 1] = i end
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    redis.call('ZADD', key, now + ttl, ARGV[1])
    extend(key, ttl)
  end
end
return {given, by, wanted}
"""

# KEYS: lease zset, replicas   → replicas with a live lease and a live heartbeat
LEASED_BY = _COMMON + """
local now, out = now_ms(), {}
for _, r in ipairs(redis.call('ZRANGE', KEYS[1], '(' .. now, '+inf', 'BYSCORE')) do
  if alive(KEYS[2], r, now) then out[#out + 1] = r end
end
return out
"""

# KEYS: lease zset, unload claim, owned hash   ARGV: replica, ttl_ms, model, instance...
#   → 1, or 0 while another unloads it, or -1 when instances are given and none of them is
#   the fleet's copy of the model any more (a replica has unloaded it)
TAKE_LEASE = _COMMON + """
local claim = redis.call('GET', KEYS[2])
if claim and claim ~= ARGV[1] then return 0 end
if #ARGV > 3 then
  local held = false
  for i = 4, #ARGV do
    if redis.call('HGET', KEYS[3], ARGV[i]) == ARGV[3] then held = true break end
  end
  if not held then return -1 end
end
local now, ttl = now_ms(), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
extend(KEYS[1], ttl)
return 1
"""

# KEYS: lease zset, replicas, unload claim, want, the host's reservations
# ARGV: replica, ttl_ms, if_live ('1'/'0'), model
#   → the other replicas serving it; none: the claim is this replica's now (the want ends,
#   and so do the reservations of its loads: a resident model's are only their grace).
#   With if_live, a replica the state does not count live (it lost its data) is refused: {it}.
CLAIM_UNLOAD = _COMMON + """
local now, out = now_ms(), {}
if ARGV[3] == '1' and not alive(KEYS[2], ARGV[1], now) then return {ARGV[1]} end
for _, r in ipairs(redis.call('ZRANGE', KEYS[1], '(' .. now, '+inf', 'BYSCORE')) do
  if r ~= ARGV[1] and alive(KEYS[2], r, now) then out[#out + 1] = r end
end
if #out == 0 then
  redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
  redis.call('DEL', KEYS[4])
  local suffix = '|' .. ARGV[4]
  for _, f in ipairs(redis.call('HKEYS', KEYS[5])) do
    if string.sub(f, -#suffix) == suffix then redis.call('HDEL', KEYS[5], f) end
  end
end
return out
"""

# KEYS: want, replicas   → the replica whose want stands, if its heartbeat lives
WANTED_BY = _COMMON + """
local want = redis.call('GET', KEYS[1])
if want and alive(KEYS[2], want, now_ms()) then return want end
return false
"""

# KEYS: wants   ARGV: replica   (each want ended only if it is this replica's)
WITHDRAW_WANTS = """
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
end
"""

# KEYS: zset of "replica|model" → expiry, replicas   → live members of live replicas
LIVE_OF_LIVE = _COMMON + """
local now, out = now_ms(), {}
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], '(' .. now, '+inf', 'BYSCORE')) do
  if alive(KEYS[2], string.match(m, '^([^|]*)|'), now) then out[#out + 1] = m end
end
return out
"""

# KEYS: learned hash   ARGV: model, replica, footprint ('' for none), load_s ('' for none),
#   ttl_ms   → the stamp (ms). Fields "<model>|footprint" and "<model>|load" hold
#   "<at_ms> <value> <replica>".
PUT_LEARNED = _COMMON + """
local now = now_ms()
local stamp = string.format('%d', now)
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], ARGV[1] .. '|footprint', stamp .. ' ' .. ARGV[3] .. ' ' .. ARGV[2])
end
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[1], ARGV[1] .. '|load', stamp .. ' ' .. ARGV[4] .. ' ' .. ARGV[2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return now
"""

# KEYS: owned hash, lock   ARGV: instance, model, ttl_ms, fence ('' for none)   → 1 | 0
ADD_OWNED = """
if ARGV[4] ~= '' then
  local holder = redis.call('GET', KEYS[2])
  if not holder or string.match(holder, '^(%d+):') ~= ARGV[4] then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS: per host, its load lock and its owned hash   ARGV: model
#   → per host {the replica loading the model or '', 1 if the fleet's copy is resident}
WHEREABOUTS = """
local out = {}
for i = 1, #KEYS, 2 do
  local holder = redis.call('GET', KEYS[i]) or ''
  local loaded, owned = 0, redis.call('HGETALL', KEYS[i + 1])
  for j = 2, #owned, 2 do
    if owned[j] == ARGV[1] then loaded = 1 break end
  end
  out[#out + 1] = {string.match(holder, '^%d+:(.*)$') or '', loaded}
end
return out
"""

# KEYS: leader   ARGV: replica, ttl_ms   → 1 while this replica leads
CAMPAIGN = """
local current = redis.call('GET', KEYS[1])
if not current then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
