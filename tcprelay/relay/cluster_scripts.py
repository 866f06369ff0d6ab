"""
The Lua scripts the cluster layer runs in Redis (:mod:`tcprelay.relay.cluster`).

Each script runs atomically in Redis, so a claim is decided in one step
whatever the other nodes do at the same time.  Every key starts with the
cluster's prefix (``tcprelay:`` by default):

``PREFIX route:KIND:NAME`` (KIND ``port``, ``http`` or ``tls``)
    JSON ``{"c": credential, "p": pooled, "n": {NODE: {"e": expiry_ms,
    "l": [lease tokens]}}, "g": {token: expiry_ms}}``: the credential the
    route belongs to, whether it is pooled, the nodes serving it (each with
    its own expiry, refreshed by that node, and the lease tokens of its
    agents on it), and the tokens whose agents moved to another node.  The
    key expires (``PX``) with the last refresh.

``PREFIX node:NODE``
    JSON ``{"name", "address", "routes": ["KIND:NAME", ...], "since"}``,
    expiring (``PX``) unless the node refreshes it.

``PREFIX secret``
    The cluster secret, when the nodes are not given one
    (``--cluster-secret``): created by the first node, deleted by the last
    one to stop.

``PREFIX events`` (a pub/sub channel, not a key)
    ``claim NODE KEY`` and ``release NODE KEY`` for port routes, so that
    the other nodes listen on (or stop listening on) a port at once.

An entry whose expiry has passed counts as absent (a dead node's routes are
free after the TTL even in a record another node keeps alive).  Times are
Redis's own (``TIME``), so the nodes' clocks do not matter.
"""

from __future__ import annotations

__all__ = ["CLAIM", "LEAVE", "LOOKUP", "REFRESH", "RELEASE", "SECRET"]

_COMMON = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function load(key, now)
  local raw = redis.call('GET', key)
  if not raw then return nil end
  local ok, rec = pcall(cjson.decode, raw)
  if not ok or type(rec) ~= 'table' or type(rec.n) ~= 'table' then return nil end
  local live = false
  for node, entry in pairs(rec.n) do
    if type(entry) ~= 'table' or (tonumber(entry.e) or 0) < now then
      rec.n[node] = nil
    else
      if type(entry.l) ~= 'table' then entry.l = {} end
      live = true
    end
  end
  if type(rec.g) ~= 'table' then rec.g = {} end
  for token, expiry in pairs(rec.g) do
    if (tonumber(expiry) or 0) < now then rec.g[token] = nil end
  end
  if not live then return nil end
  return rec
end
local function store(key, rec, ttl)
  redis.call('SET', key, cjson.encode(rec), 'PX', ttl)
end
"""

CLAIM = (
    _COMMON
    + """
-- KEYS[1] route key; ARGV node, credential, lease token, pooled (1/0), ttl ms,
-- channel: where a route taken is announced ('' for none)
local key = KEYS[1]
local node, cred, lease, pool, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4] == '1', tonumber(ARGV[5])
local channel = ARGV[6] or ''
local function announce()
  if channel ~= '' then redis.call('PUBLISH', channel, 'claim ' .. node .. ' ' .. key) end
end
local now = now_ms()
local rec = load(key, now)
if not rec then
  rec = {c = cred, p = pool, n = {}, g = {}}
  rec.n[node] = {e = now + ttl, l = {}}
  store(key, rec, ttl)
  announce()
  return {'ok', node}
end
if rec.n[node] then return {'local', node} end
if lease ~= '' and rec.c == cred and not rec.g[lease] then
  for other, entry in pairs(rec.n) do
    for i, token in ipairs(entry.l) do
      if token == lease then
        table.remove(entry.l, i)
        rec.g[lease] = now + 2 * ttl
        if #entry.l == 0 then rec.n[other] = nil end
        rec.n[node] = {e = now + ttl, l = {}}
        store(key, rec, ttl)
        announce()
        return {'moved', other}
      end
    end
  end
end
local owner = next(rec.n)
if rec.c ~= cred then return {'other', owner} end
if pool and rec.p then
  rec.n[node] = {e = now + ttl, l = {}}
  store(key, rec, ttl)
  announce()
  return {'joined', owner}
end
if rec.p then return {'pooled', owner} end
return {'taken', owner}
"""
)

REFRESH = (
    _COMMON
    + """
-- KEYS[1] node key, KEYS[2..] route keys; ARGV node, ttl ms, node info, prefix,
-- then per route: credential, pooled (1/0), lease tokens (JSON array)
local node, ttl, info, prefix = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local now = now_ms()
redis.call('SET', KEYS[1], info, 'PX', ttl)
local lost = {}
for i = 2, #KEYS do
  local base = 4 + (i - 2) * 3
  local cred, pool = ARGV[base + 1], ARGV[base + 2] == '1'
  local tokens = cjson.decode(ARGV[base + 3])
  local key = KEYS[i]
  local rec = load(key, now)
  if not rec then rec = {c = cred, p = pool, n = {}, g = {}} end
  if rec.n[node] == nil and next(rec.n) ~= nil and not (rec.c == cred and rec.p and pool) then
    table.insert(lost, {i - 1, '*'})
  else
    local keep, gone = {}, {}
    for _, token in ipairs(tokens) do
      if rec.g[token] then table.insert(gone, token) else table.insert(keep, token) end
    end
    if #gone > 0 then table.insert(lost, {i - 1, table.concat(gone, ' ')}) end
    rec.n[node] = {e = now + ttl, l = keep}
    store(key, rec, ttl)
  end
end
local out = {cjson.encode(lost)}
local cursor = '0'
repeat
  local r = redis.call('SCAN', cursor, 'MATCH', prefix .. 'node:*', 'COUNT', 100)
  cursor = r[1]
  for _, k in ipairs(r[2]) do
    local v = redis.call('GET', k)
    if v then table.insert(out, v) end
  end
until cursor == '0'
return out
"""
)

RELEASE = (
    _COMMON
    + """
-- KEYS route keys; ARGV node: this node no longer serves them; channel
-- ('' for none): where that is announced
local node = ARGV[1]
local channel = ARGV[2] or ''
local now = now_ms()
for _, key in ipairs(KEYS) do
  local rec = load(key, now)
  if not rec then
    redis.call('DEL', key)
  elseif rec.n[node] ~= nil then
    rec.n[node] = nil
    if channel ~= '' then redis.call('PUBLISH', channel, 'release ' .. node .. ' ' .. key) end
    if next(rec.n) == nil then
      redis.call('DEL', key)
    else
      redis.call('SET', key, cjson.encode(rec), 'KEEPTTL')
    end
  end
end
return 1
"""
)

LEAVE = RELEASE.replace(
    "for _, key in ipairs(KEYS) do", "for i = 2, #KEYS do\n  local key = KEYS[i]", 1
).replace(
    "return 1\n",
    """redis.call('DEL', KEYS[1])
-- the last node to leave takes the cluster secret kept in Redis with it
local r = redis.call('SCAN', '0', 'MATCH', ARGV[3] .. 'node:*', 'COUNT', 1000)
local others = #r[2] > 0
while not others and r[1] ~= '0' do
  r = redis.call('SCAN', r[1], 'MATCH', ARGV[3] .. 'node:*', 'COUNT', 1000)
  others = #r[2] > 0
end
if not others then redis.call('DEL', ARGV[3] .. 'secret') end
return 1
""",
)
"""Like RELEASE for KEYS[2..] (ARGV node, channel, prefix), and the node's
own key (KEYS[1]) deleted; the last node also deletes ``PREFIX secret``."""

SECRET = """
-- KEYS[1] the secret's key; ARGV[1] the secret to keep if there is none
local v = redis.call('GET', KEYS[1])
if not v then
  v = ARGV[1]
  redis.call('SET', KEYS[1], v)
end
return v
"""
"""The cluster secret kept in Redis when the nodes are given none."""

LOOKUP = (
    _COMMON
    + """
-- KEYS candidate route keys, most specific first; ARGV prefix
local now = now_ms()
for i, key in ipairs(KEYS) do
  local rec = load(key, now)
  if rec then
    local out = {tostring(i)}
    for node, _ in pairs(rec.n) do
      local info = redis.call('GET', ARGV[1] .. 'node:' .. node)
      if info then table.insert(out, info) end
    end
    return out
  end
end
return {}
"""
)
