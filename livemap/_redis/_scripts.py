"""The Lua scripts a shared map runs in Redis, and the names of its keys.

All keys of one map share the hash tag ``{name}`` (``<prefix>:{<name>}:...``),
so a script touching several of them is valid on a cluster too.  Per map:

* ``epoch``: a random token set when the map's data first appears; a
  producer that finds it missing or changed knows Redis lost its data (a
  restart without persistence) and uploads what it holds again.
* ``meta``: the number of shards, fixed at first use.
* per shard ``s``: ``d:s`` (hash: encoded key -> encoded value, the
  snapshot), ``o:s`` (hash: key -> owner record), ``c:s`` / ``cv:s``
  (hashes: a pending claim's record and value), ``n:s`` (the shard's change
  counter), ``x:s`` (the change stream), ``lease:s`` (the consumer's lease).
* per owner: ``k:<owner id>`` (set of ``s|key``: what the owner holds).
* per producing app: ``app:<app>`` (its lease: the holder's instance token,
  with a TTL), ``ao:<app>`` (set of its owner ids), and its fields in
  ``last`` (the lease's latest holder), ``turn`` (how many times the
  holder changed) and ``swept`` (the instance that swept the app last).

An owner id is ``<app name> US <component path>`` (US: the unit separator,
0x1f); an owner record is ``<owner id> RS <instance token>`` (RS: 0x1e), the
token telling one producer process (and app) from another, and from its own
earlier life.  A stream entry has the fields ``n`` (the shard's counter after it:
one more than the entry before, so a consumer sees a gap), ``e`` (the
epoch) and ``p``: the
changes, each ``u`` + 4-byte length + key + 4-byte length + value, or ``d``
+ 4-byte length + key.
"""

from __future__ import annotations

__all__ = [
    "COMMIT",
    "INIT",
    "LEASE_ACQUIRE",
    "LEASE_RELEASE",
    "OWNER_SEP",
    "RECORD_SEP",
    "SNAPSHOT",
    "base_key",
]

OWNER_SEP = "\x1f"
RECORD_SEP = "\x1e"


def base_key(prefix: str, name: str) -> str:
    """``<prefix>:{<name>}``, the start of every key of the map."""
    return f"{prefix}:{{{name}}}"


# KEYS[1] base; ARGV: new epoch, shards.  Returns {epoch, shards}.
INIT = """
local base = KEYS[1]
redis.call('SET', base .. ':epoch', ARGV[1], 'NX')
redis.call('HSETNX', base .. ':meta', 'shards', ARGV[2])
return {redis.call('GET', base .. ':epoch'), redis.call('HGET', base .. ':meta', 'shards')}
"""

# What the scripts that write a map's keys share: the lease check of the
# calling app (``holds``), stream records (``emit``, flushed by ``flush``),
# the owner records and their handover (``take``, ``drop``).  Expects
# ``base``, ``inst`` (the caller's instance token), ``app`` (its app name),
# ``ttl`` (its lease's TTL, ms) and ``epoch`` as locals.
_EPOCH_CHECK = """
local base = KEYS[1]
local epoch = redis.call('GET', base .. ':epoch')
if epoch ~= ARGV[1] then
  return {'epoch', epoch or ''}
end"""
"""The start of a script that changes a map: KEYS[1] is its base and ARGV[1]
the epoch the caller knows; another epoch (the map was made again, or Redis
lost its data) returns ``{'epoch', current epoch or ''}``."""

_SHARED = """
local call = redis.call
local SEP = '\\30'
local OSEP = '\\31'
local pack = struct.pack
local recs = {}
local touched = {}
-- arguments per bulk command (Lua's unpack fails near 5,000)
local CH = 1000
local function hmget(h, keys, m)
  local out = {}
  for a = 1, m, CH do
    local z = math.min(a + CH - 1, m)
    local got = call('HMGET', h, unpack(keys, a, z))
    for j = a, z do
      out[j] = got[j - a + 1]
    end
  end
  return out
end
local function bulk(cmd, key, items)
  for a = 1, #items, CH do
    call(cmd, key, unpack(items, a, math.min(a + CH - 1, #items)))
  end
end
local function split(rec)
  local p = string.find(rec, SEP, 1, true)
  return string.sub(rec, 1, p - 1), string.sub(rec, p + 1)
end
local function app_of(oid)
  return string.sub(oid, 1, string.find(oid, OSEP, 1, true) - 1)
end
-- the caller's app lease (refreshed by its holder's own task): taken when
-- free; returns nil, or the holder when another process holds it, and
-- whether the caller took it over from another lease holder (its latest
-- one was another process)
local function holds()
  local lk = base .. ':app:' .. app
  local holder = call('GET', lk)
  if holder == inst then
    return nil, false
  end
  if holder then
    return holder, false
  end
  call('SET', lk, inst, 'PX', ttl)
  local last = call('HGET', base .. ':last', app)
  if last ~= inst then
    call('HSET', base .. ':last', app, inst)
    call('HINCRBY', base .. ':turn', app, 1)
  end
  return nil, last ~= inst
end
-- whether a claim's process may still declare it: its app's lease is its
-- own, or free with it the latest holder (a catch-up app between updates)
local function claim_live(claim)
  local cid, cinst = split(claim)
  local capp = app_of(cid)
  local holder = call('GET', base .. ':app:' .. capp)
  if holder then
    return holder == cinst
  end
  local last = call('HGET', base .. ':last', capp)
  return not last or last == cinst
end
local function emit(s, rec)
  local l = recs[s]
  if l == nil then
    l = {}
    recs[s] = l
    touched[#touched + 1] = s
  end
  l[#l + 1] = rec
end
local function put(s, k, v)
  local d = base .. ':d:' .. s
  if call('HGET', d, k) ~= v then
    call('HSET', d, k, v)
    emit(s, 'u' .. pack('>I4', #k) .. k .. pack('>I4', #v) .. v)
  end
end
local function take(s, k, oid, old)
  if old then
    call('SREM', base .. ':k:' .. old, s .. '|' .. k)
  end
  call('HSET', base .. ':o:' .. s, k, oid .. SEP .. inst)
  call('SADD', base .. ':k:' .. oid, s .. '|' .. k)
end
-- the owner oid lets go of key k of shard s: a pending claim of a live
-- process takes it over (one update), else it is deleted
local function drop(s, k, oid)
  call('SREM', base .. ':k:' .. oid, s .. '|' .. k)
  local c = base .. ':c:' .. s
  local claim = call('HGET', c, k)
  local v
  if claim then
    local cv = base .. ':cv:' .. s
    v = call('HGET', cv, k)
    call('HDEL', c, k)
    call('HDEL', cv, k)
    if not claim_live(claim) then
      claim = nil
    end
  end
  if claim then
    local cid = split(claim)
    call('HSET', base .. ':o:' .. s, k, claim)
    call('SADD', base .. ':k:' .. cid, s .. '|' .. k)
    call('SADD', base .. ':ao:' .. app_of(cid), cid)
    put(s, k, v)
  else
    call('HDEL', base .. ':o:' .. s, k)
    if call('HDEL', base .. ':d:' .. s, k) == 1 then
      emit(s, 'd' .. pack('>I4', #k) .. k)
    end
  end
end
local function flush(maxlen)
  for _, s in ipairs(touched) do
    local seq = call('INCR', base .. ':n:' .. s)
    call('XADD', base .. ':x:' .. s, 'MAXLEN', '~', maxlen, '*',
         'n', seq, 'e', epoch, 'p', table.concat(recs[s]))
  end
end
"""

# KEYS[1] base.  ARGV: epoch, instance, maxlen, app name, lease TTL (ms),
# number of owners, then per owner: owner id, reclaim flag ('1': its first
# commit from this instance, delete what it held and no longer declares, and
# note the owner in the app's ``ao`` set; '2': only note it; '0': neither;
# what an earlier process's instance holds is deleted so only once this
# instance has swept the app, see ``swept``, else left to that sweep),
# then groups of three: a shard, an owner index (1-based) and a blob of that
# owner's changes in that shard, each change packed as op (1 byte: 'u', 'd',
# or 'r': delete what the owner holds from any instance), the encoded key
# and the encoded value ('' for deletes), each after its 4-byte length.  An
# update is packed as the stream entry packs it: an update of a key the
# owner already holds, or that nobody holds, passes on to the stream as it
# came (in runs, without unpacking and packing again); the owner records and
# values of a group are read in two bulk commands, and such updates' writes
# made in bulk.  A key occurs at most once in one call.  Every owner is of
# the app named; the call takes (or refreshes) the app's lease, and changes
# nothing when another process holds it.  An update of a key that another
# owner of the app holds from an earlier process (an instance other than
# the caller's: the caller holds the lease) takes it over, as within one
# instance: a transfer, not a conflict.
# A delete applies only to what this instance (this app in this process)
# holds or claims.
# Returns {'epoch', current epoch or ''} when the epoch is not the caller's,
# {'busy', holder} when another process holds the app's lease, else {'ok',
# took over ('1' when the caller took the lease over from another process,
# else '0'), key, holder id, owner index, key, holder id, owner index, ...}
# for the claims that met another owner (new ones only).
COMMIT = (
    _EPOCH_CHECK
    + """
local inst = ARGV[2]
local maxlen = ARGV[3]
local app = ARGV[4]
local ttl = ARGV[5]
local nown = tonumber(ARGV[6])
"""
    + _SHARED
    + """
local busy, took = holds()
if busy then
  return {'busy', busy}
end
local owners = {}
local reclaim = {}
local mine = {}
local noted = {}
local i = 7
for o = 1, nown do
  owners[o] = ARGV[i]
  mine[o] = ARGV[i] .. SEP .. inst
  reclaim[o] = ARGV[i + 1] == '1'
  if ARGV[i + 1] ~= '0' then
    noted[#noted + 1] = ARGV[i]
  end
  i = i + 2
end
for a = 1, #noted, CH do
  call('SADD', base .. ':ao:' .. app, unpack(noted, a, math.min(a + CH - 1, #noted)))
end
local conflicts = {'ok', took and '1' or '0'}
-- whether this instance has swept the app's keys: until it has, what an
-- owner's first commit no longer declares and an earlier process's
-- instance holds is left to that sweep (a component of this process may
-- still take it over: a transfer, not a delete and an insert)
local swept
local function lets_go(rec, oid)
  local hid, hinst = split(rec)
  if hid ~= oid then
    return false
  end
  if hinst == inst then
    return true
  end
  if swept == nil then
    swept = call('HGET', base .. ':swept', app) == inst
  end
  return swept
end
-- one change, the general way: the owner record read and acted on
local function change(op, s, oi, k, v)
  local oid = owners[oi]
  local o = base .. ':o:' .. s
  local rec = call('HGET', o, k)
  if op == 'u' then
    if rec == mine[oi] then
      put(s, k, v)
    elseif not rec then
      take(s, k, oid, nil)
      put(s, k, v)
    else
      local hid, hinst = split(rec)
      if hid == oid then
        if hinst ~= inst then
          call('HSET', o, k, oid .. SEP .. inst)
        end
        put(s, k, v)
      elseif hinst == inst or app_of(hid) == app then
        -- within this instance, or from an earlier process of the app (this
        -- one holds its lease): a transfer
        take(s, k, oid, hid)
        put(s, k, v)
      else
        local c = base .. ':c:' .. s
        local claim = call('HGET', c, k)
        local cid = claim and split(claim)
        if not claim or cid == oid then
          call('HSET', c, k, oid .. SEP .. inst)
          call('HSET', base .. ':cv:' .. s, k, v)
        end
        if claim ~= oid .. SEP .. inst then
          conflicts[#conflicts + 1] = k
          conflicts[#conflicts + 1] = hid
          conflicts[#conflicts + 1] = oi
        end
      end
    end
  elseif op == 'r' then
    if rec and lets_go(rec, oid) then
      drop(s, k, oid)
    end
  elseif rec then
    if rec == mine[oi] then
      drop(s, k, oid)
    else
      local c = base .. ':c:' .. s
      local claim = call('HGET', c, k)
      if claim == oid .. SEP .. inst then
        call('HDEL', c, k)
        call('HDEL', base .. ':cv:' .. s, k)
      end
    end
  end
end
local declared = {}
local n = #ARGV
local unpackb = struct.unpack
while i <= n do
  local s = tonumber(ARGV[i])
  local oi = tonumber(ARGV[i + 1])
  local blob = ARGV[i + 2]
  i = i + 3
  local ops, ks, vs, at = {}, {}, {}, {}
  local m = 0
  local pos = 1
  local size = #blob
  while pos <= size do
    m = m + 1
    at[m] = pos
    ops[m], ks[m], vs[m], pos = unpackb('>c1I4c0I4c0', blob, pos)
  end
  at[m + 1] = size + 1
  local o = base .. ':o:' .. s
  local d = base .. ':d:' .. s
  local held = hmget(o, ks, m)
  local cur = hmget(d, ks, m)
  local me = mine[oi]
  local mark = reclaim[oi] and owners[oi] .. SEP .. s .. '|'
  local writes = {}
  local taken = {}
  local members = {}
  -- the updates of keys the owner holds or nobody holds: the record itself
  -- is the stream's, emitted in runs, and the writes go in bulk at the end;
  -- everything else goes the general way
  local run = 1
  for j = 1, m do
    local op, k, v = ops[j], ks[j], vs[j]
    if mark and op == 'u' then
      declared[mark .. k] = true
    end
    local h = held[j]
    if op == 'u' and (h == me or not h) then
      if not h then
        taken[#taken + 1] = k
        taken[#taken + 1] = me
        members[#members + 1] = s .. '|' .. k
      end
      if cur[j] ~= v then
        writes[#writes + 1] = k
        writes[#writes + 1] = v
      else
        if run < j then
          emit(s, string.sub(blob, at[run], at[j] - 1))
        end
        run = j + 1
      end
    else
      if run < j then
        emit(s, string.sub(blob, at[run], at[j] - 1))
      end
      run = j + 1
      change(op, s, oi, k, v)
    end
  end
  if run == 1 and m > 0 then
    emit(s, blob)
  elseif run <= m then
    emit(s, string.sub(blob, at[run], size))
  end
  for a = 1, #writes, CH do
    call('HSET', d, unpack(writes, a, math.min(a + CH - 1, #writes)))
  end
  for a = 1, #taken, CH do
    call('HSET', o, unpack(taken, a, math.min(a + CH - 1, #taken)))
  end
  local kset = base .. ':k:' .. owners[oi]
  for a = 1, #members, CH do
    call('SADD', kset, unpack(members, a, math.min(a + CH - 1, #members)))
  end
end
for o = 1, nown do
  if reclaim[o] then
    local oid = owners[o]
    local members = call('SMEMBERS', base .. ':k:' .. oid)
    for _, m in ipairs(members) do
      if not declared[oid .. SEP .. m] then
        local p = string.find(m, '|', 1, true)
        local s = tonumber(string.sub(m, 1, p - 1))
        local k = string.sub(m, p + 1)
        local rec = call('HGET', base .. ':o:' .. s, k)
        if not rec or split(rec) ~= oid then
          call('SREM', base .. ':k:' .. oid, m)
        elseif lets_go(rec, oid) then
          drop(s, k, oid)
        end
      end
    end
  end
end
flush(maxlen)
return conflicts
"""
)

# KEYS[1] base; ARGV: app name, instance, lease TTL (ms).  Takes the app's
# lease when it is free or the caller's.  Returns {1, the token of the
# app's latest holder before, or '', the app's turn, the map's epoch or ''}
# or {0, the holder}.  The turn (``turn``, per app) counts the changes of
# the lease's holder: a holder that finds it moved since it last made its
# entries whole in Redis uploads them again before it sweeps.
APP_ACQUIRE = """
local base = KEYS[1]
local app = ARGV[1]
local inst = ARGV[2]
local lk = base .. ':app:' .. app
local holder = redis.call('GET', lk)
if holder and holder ~= inst then
  return {0, holder}
end
redis.call('SET', lk, inst, 'PX', ARGV[3])
local last = redis.call('HGET', base .. ':last', app)
if last ~= inst then
  redis.call('HSET', base .. ':last', app, inst)
  redis.call('HINCRBY', base .. ':turn', app, 1)
end
return {1, last or '', redis.call('HGET', base .. ':turn', app) or '0',
        redis.call('GET', base .. ':epoch') or ''}
"""

# KEYS[1] base; ARGV: app name, instance.  Gives the app's lease up if the
# caller holds it.
APP_RELEASE = """
local lk = KEYS[1] .. ':app:' .. ARGV[1]
if redis.call('GET', lk) == ARGV[2] then
  redis.call('DEL', lk)
end
return 1
"""

# KEYS[1] base.  ARGV: epoch, instance, app name, lease TTL (ms), maxlen,
# the app's turn the caller's entries were made whole at, then the owner
# ids to keep.  The sweep of an app's keys that no process of it declares
# any more: with the app's lease (taken when free), every key an owner of
# the app holds from another instance (an earlier process of the app) is
# let go (deleted, or handed to a pending claim), unless its owner is one
# to keep.  Returns {'epoch', ...}, {'busy', holder} as COMMIT does,
# {'moved', turn} when the app's turn is not the one given (another
# process held the lease since: the caller's entries must be uploaded
# again first; nothing is let go), or {'ok', the number of keys let go}.
SWEEP = (
    _EPOCH_CHECK
    + """
local inst = ARGV[2]
local app = ARGV[3]
local ttl = ARGV[4]
local maxlen = ARGV[5]
"""
    + _SHARED
    + """
local busy = holds()
if busy then
  return {'busy', busy}
end
local turn = call('HGET', base .. ':turn', app) or '0'
if turn ~= ARGV[6] then
  return {'moved', turn}
end
local keep = {}
for a = 7, #ARGV do
  keep[ARGV[a]] = true
end
local ao = base .. ':ao:' .. app
local gone = 0
-- per owner and shard: the owner records and pending claims read in bulk;
-- the keys without a claim deleted in bulk, the others the general way
for _, oid in ipairs(call('SMEMBERS', ao)) do
  if not keep[oid] then
    local kset = base .. ':k:' .. oid
    local members = call('SMEMBERS', kset)
    local by = {}
    local shards = {}
    for _, m in ipairs(members) do
      local p = string.find(m, '|', 1, true)
      local s = string.sub(m, 1, p - 1)
      local l = by[s]
      if l == nil then
        l = {}
        by[s] = l
        shards[#shards + 1] = s
      end
      l[#l + 1] = string.sub(m, p + 1)
    end
    local left = {}
    for _, s in ipairs(shards) do
      local ks = by[s]
      local o = base .. ':o:' .. s
      local held = hmget(o, ks, #ks)
      local drops = {}
      for j, k in ipairs(ks) do
        local rec = held[j]
        local hid, hinst
        if rec then
          hid, hinst = split(rec)
        end
        if hid ~= oid then
          left[#left + 1] = s .. '|' .. k
        elseif hinst ~= inst then
          drops[#drops + 1] = k
        end
      end
      gone = gone + #drops
      local plain = drops
      if #drops > 0 and call('EXISTS', base .. ':c:' .. s) == 1 then
        plain = {}
        local claims = hmget(base .. ':c:' .. s, drops, #drops)
        for j, k in ipairs(drops) do
          if claims[j] then
            drop(tonumber(s), k, oid)
          else
            plain[#plain + 1] = k
          end
        end
      end
      if #plain > 0 then
        local d = base .. ':d:' .. s
        local cur = hmget(d, plain, #plain)
        for j, k in ipairs(plain) do
          if cur[j] then
            emit(tonumber(s), 'd' .. pack('>I4', #k) .. k)
          end
        end
        bulk('HDEL', d, plain)
        bulk('HDEL', o, plain)
        local ms = {}
        for j, k in ipairs(plain) do
          ms[j] = s .. '|' .. k
        end
        bulk('SREM', kset, ms)
      end
    end
    bulk('SREM', kset, left)
    if call('SCARD', kset) == 0 then
      call('SREM', ao, oid)
    end
  end
end
flush(maxlen)
call('HSET', base .. ':swept', app, inst)
return {'ok', gone}
"""
)

# KEYS[1] base; ARGV: shards.  Returns, per shard: counter, last stream id,
# then {key, value, key, value, ...} (the whole snapshot, in one atomic step).
SNAPSHOT = """
local base = KEYS[1]
local out = {}
for _, s in ipairs(ARGV) do
  local seq = redis.call('GET', base .. ':n:' .. s) or '0'
  local last = redis.call('XREVRANGE', base .. ':x:' .. s, '+', '-', 'COUNT', 1)
  local id = '0-0'
  if last[1] then
    id = last[1][1]
  end
  out[#out + 1] = seq
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGETALL', base .. ':d:' .. s)
end
return out
"""

# KEYS: lease keys; ARGV: token, ttl ms.  Takes (or refreshes) every lease or
# none: returns 0 and the holders' tokens in order, or 1.
LEASE_ACQUIRE = """
local holders = {}
local busy = false
for i, k in ipairs(KEYS) do
  local h = redis.call('GET', k)
  holders[i] = h or ''
  if h and h ~= ARGV[1] then
    busy = true
  end
end
if busy then
  return {0, holders}
end
for _, k in ipairs(KEYS) do
  redis.call('SET', k, ARGV[1], 'PX', ARGV[2])
end
return {1, holders}
"""

# KEYS: lease keys; ARGV: token.  Deletes the leases the token holds.
LEASE_RELEASE = """
for _, k in ipairs(KEYS) do
  if redis.call('GET', k) == ARGV[1] then
    redis.call('DEL', k)
  end
end
return 1
"""
