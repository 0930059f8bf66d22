"""The Redis scripts. `memory.py` and `gcra.py` implement the same steps in Python; one test suite checks both.

Every key a script touches carries the same hash tag (the account's), so Redis Cluster accepts it. They are
passed in KEYS, except the usage ledger's (a stream and daily aggregates, proxy/store/ledger.py) and the ticket
of an expired hold being charged: those are derived in the script from the account's key prefix, which carries
the tag, so they live in the slot of the declared keys.
Every argument is an integer (the caller validates them: proxy/store/base.py check_admit, check_settle,
check_renew, and computes GCRA products exactly in Python: gcra.Step). Every script reads and computes
first and writes last, and every number it writes goes through `int` (plain digits: never `-0`, an
exponent or a fraction), so no input can make a script fail halfway.
"""

# Every expiry is judged by the gateway's clock (`now`); Redis TTLs only collect garbage, and run GRACE ms
# past the logical expiry, so that a replica whose clock lags (or a call that reached Redis late) never finds
# a key gone that is still alive by its clock. A present but logically expired key reads as absent.
_PRELUDE = r"""
local GRACE = 2000

local function int(x)
  return string.format('%d', x)
end
"""

# Shared by admit and settle: GCRA arrival times, charging expired credit holds.
_COMMON = _PRELUDE + r"""
local now = tonumber(ARGV[1])

-- An arrival time is {ms, num}: ms + num / limit, 0 <= num < limit (gcra.py). Stored as "ms:num:limit".
local function read_tat(key, limit)
  local raw = redis.call('GET', key)
  if not raw then return nil end
  local ms, num, den = string.match(raw, '^(%-?%d+):(%d+):(%d+)$')
  if not ms then return nil end  -- not ours (an older format): the limit starts afresh
  ms, num = tonumber(ms), tonumber(num)
  if tonumber(den) ~= limit then  -- kept under another limit: round up to the next ms
    if num > 0 then ms = ms + 1 end
    num = 0
  end
  return {ms, num}
end

local function start_of(tat)
  if tat and tat[1] >= now then return tat end
  return {now, 0}
end

local function shifted(tat, whole, rem, limit)
  local ms, num = tat[1] + whole, tat[2] + rem
  if num >= limit then return {ms + 1, num - limit} end
  return {ms, num}
end

local function ceil_ms(tat)
  if tat[2] > 0 then return tat[1] + 1 end
  return tat[1]
end

local function store_tat(key, tat, limit)
  if (not tat) or tat[1] < now or (tat[1] == now and tat[2] == 0) then
    redis.call('DEL', key)
  else
    redis.call('SET', key, int(tat[1]) .. ':' .. int(tat[2]) .. ':' .. int(limit), 'PX', int(ceil_ms(tat) - now + GRACE))
  end
end

local function add(ledger, field, delta)
  if delta ~= 0 then redis.call('HINCRBY', ledger, field, int(delta)) end
end

-- The usage ledger (docs/usage.md): one record per settle and per expired hold, in a stream per account, and
-- daily aggregates beside it (the account's and the user's, by model). ARGV[o+1 .. o+LEDGER_ARGS]: on (0|1),
-- account prefix, day (YYYYMMDD), aggregates expire-at, max records, min record id (ms), stream lifetime ms,
-- then who the call is for: request id, account, key, user, model.
local LEDGER_ARGS = 12
local function read_ledger(o)
  if ARGV[o + 1] ~= '1' then return nil end
  return {prefix = ARGV[o + 2], day = ARGV[o + 3], usage_exp = ARGV[o + 4], max_len = ARGV[o + 5],
          min_id = ARGV[o + 6], keep = tonumber(ARGV[o + 7]), q = ARGV[o + 8], account = ARGV[o + 9],
          k = ARGV[o + 10], u = ARGV[o + 11], m = ARGV[o + 12]}
end

local RECORD_FIELDS = {'id', 'request_id', 'ts', 'account', 'key', 'user', 'model', 'provider', 'deployment',
  'tokens_in', 'tokens_out', 'images', 'seconds_ms', 'credits', 'reserved', 'outcome', 'late', 'reason', 'actor'}
local METRICS = {'calls', 'credits', 'tokens_in', 'tokens_out', 'images', 'seconds_ms'}

local function record(lg, r)
  r.ts, r.account = now, lg.account
  local entry = {}
  for _, name in ipairs(RECORD_FIELDS) do
    local value = r[name] or ''  -- reason and actor: only an admin's adjustment has them
    if type(value) == 'number' then value = int(value) end
    entry[#entry + 1] = name
    entry[#entry + 1] = value
  end
  local stream = lg.prefix .. ':lg'
  redis.call('XADD', stream, 'MAXLEN', '~', lg.max_len, '*', unpack(entry))
  redis.call('XTRIM', stream, 'MINID', '~', lg.min_id)
  redis.call('PEXPIRE', stream, int(lg.keep + GRACE))
  if r.outcome == 'topup' or r.outcome == 'adjustment' then return end  -- a balance change, not usage
  -- a call counts once: when charged at its settle or at its hold's expiry, not again when a late settle corrects
  -- it; a late release or cancel (nothing billable after all) takes back the count of its expired hold
  local undone = r.outcome == 'released' or r.outcome == 'cancelled'
  r.calls = 0
  if r.late == 0 and not undone then r.calls = 1 elseif r.late == 1 and undone then r.calls = -1 end
  local totals = {lg.prefix .. ':us:a:' .. lg.day}
  if r.user ~= '' then totals[2] = lg.prefix .. ':us:u:' .. r.user .. ':' .. lg.day end
  for _, key in ipairs(totals) do
    -- the day's expiry is set when a field is created (an increment that returns its own delta), not again by
    -- every settle of the day: a field exists only in a key that already got it
    local created = false
    for _, metric in ipairs(METRICS) do
      local delta = r[metric]
      if delta ~= 0 and redis.call('HINCRBY', key, metric .. ':' .. r.model, int(delta)) == delta then
        created = true
      end
    end
    if created then redis.call('PEXPIREAT', key, lg.usage_exp) end
  end
end

-- Expired holds are charged at the amount they reserved (see docs/metering.md), each with its ledger record
-- (who it was for is read from its ticket, which outlives the hold). Bounded per call.
local function sweep(ledger, holds, lg)
  local expired = redis.call('ZRANGEBYSCORE', holds, '-inf', int(now), 'LIMIT', 0, 100)
  if #expired == 0 then return end
  local total = 0
  for _, member in ipairs(expired) do
    local reserved = tonumber(string.match(member, '^(%d+):')) or 0
    total = total + reserved
    if lg then
      local rid = string.match(member, '^%d+:(.*)$') or ''
      local who = redis.call('HMGET', lg.prefix .. ':tk:' .. rid, 'q', 'k', 'u', 'm', 'exp')
      if not (tonumber(who[5]) and tonumber(who[5]) > now) then who = {} end  -- expired by the clock: absent
      record(lg, {id = rid .. ':expired', request_id = who[1] or '', key = who[2] or '', user = who[3] or '',
        model = who[4] or '', provider = '', deployment = '', tokens_in = 0, tokens_out = 0, images = 0,
        seconds_ms = 0, credits = reserved, reserved = reserved, outcome = 'expired', late = 0})
    end
  end
  redis.call('ZREM', holds, unpack(expired))
  add(ledger, 'held', -total)
  add(ledger, 'spent', total)
end

-- Budget alerts (docs/usage.md): a threshold `spent` has reached is claimed once per credit ledger (so once per
-- budget period) by HSETNX of `al:<basis points>` beside `spent`, and appended to the account's outbox in the
-- same step. ARGV[o+1 .. o+ALERT_ARGS]: budget id ('' = no alerts), levels "<bp>:<micro-credits>,...", outbox
-- lifetime ms, the budget in micro-credits. Returns how many alerts it claimed.
local ALERT_ARGS = 4
local function claim_alerts(ledger, lg, o)
  if (not lg) or ARGV[o + 1] == '' then return 0 end
  local spent = tonumber(redis.call('HGET', ledger, 'spent')) or 0
  local outbox, fired = lg.prefix .. ':al', 0
  for bp, amount in string.gmatch(ARGV[o + 2], '(%d+):(%d+)') do
    if spent >= tonumber(amount) and redis.call('HSETNX', ledger, 'al:' .. bp, int(now)) == 1 then
      redis.call('XADD', outbox, 'MAXLEN', '~', 10000, '*', 'id', ARGV[o + 1] .. '/' .. bp, 'ts', int(now),
        'account', lg.account, 'budget', ARGV[o + 1], 'threshold_bp', bp, 'budget_micro', ARGV[o + 4],
        'spent_micro', int(spent), 'key', lg.k, 'user', lg.u, 'request_id', lg.q)
      fired = fired + 1
    end
  end
  if fired > 0 then redis.call('PEXPIRE', outbox, ARGV[o + 3]) end
  return fired
end

local function expire_ledger(ledger, holds, expire_at)
  if expire_at > 0 then
    redis.call('PEXPIREAT', ledger, int(expire_at))
    redis.call('PEXPIREAT', holds, int(expire_at))
  end
end
"""

# KEYS: ticket, lease zset, ledger hash, holds zset, then one key per rate limit.
# ARGV: now_ms, reservation id, ttl_ms, dry (0|1), lease limit (-1 = none), budget (-1 = none),
#       amount, ledger expire-at (0 = keep), the usage ledger's block (LEDGER_ARGS), then per limit: limit,
#       window ms, cost·T as (whole ms, rem), fits (0 if the cost exceeds the limit: it never fits).
# Reply: allowed, denial kind (0 none, 1 rate, 2 concurrency, 3 credits, 4 cancelled), denied limit index,
#        retry ms (-1 never), in flight, spent, held, then the arrival time (ms, num) per limit (-1, 0: idle).
ADMIT = _COMMON + r"""
local rid, ttl, dry = ARGV[2], tonumber(ARGV[3]), ARGV[4] == '1'
local lease_limit, budget = tonumber(ARGV[5]), tonumber(ARGV[6])
local amount = tonumber(ARGV[7])
local lg = read_ledger(8)
local n = #KEYS - 4
-- a tombstone: this admit was cancelled (its caller gave up on it) before it got here; take nothing
-- (judged by `now`, like every expiry: a key Redis still keeps for its grace period is gone)
local ticket_exp = tonumber(redis.call('HGET', KEYS[1], 'exp'))
if not dry and ticket_exp and ticket_exp > now then return {0, 4, 0, -1, 0, 0, 0} end

local limits, tats, new_tats = {}, {}, {}
local kind, index, retry = 0, 0, 0
for i = 1, n do
  local base = 8 + LEDGER_ARGS + (i - 1) * 5
  local limit, window = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2])
  local fits = ARGV[base + 5] == '1'
  limits[i] = limit
  tats[i] = read_tat(KEYS[4 + i], limit)
  local wait = -1
  if fits then
    new_tats[i] = shifted(start_of(tats[i]), tonumber(ARGV[base + 3]), tonumber(ARGV[base + 4]), limit)
    wait = ceil_ms(new_tats[i]) - window - now
  end
  -- report the limit to wait longest for; one that never fits outranks all
  if ((not fits) or wait > 0) and (kind == 0 or (retry ~= -1 and (wait == -1 or wait > retry))) then
    kind, index, retry = 1, i - 1, wait
  end
end

local in_flight = 0
if lease_limit >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', int(now))
  in_flight = redis.call('ZCARD', KEYS[2])
end
local spent, held = 0, 0
if budget >= 0 then
  sweep(KEYS[3], KEYS[4], lg)
  local balance = redis.call('HMGET', KEYS[3], 'spent', 'held')
  spent, held = tonumber(balance[1]) or 0, tonumber(balance[2]) or 0
end
if kind == 0 and not dry then
  if lease_limit >= 0 and in_flight >= lease_limit then
    kind = 2
  elseif budget >= 0 and spent + held + amount > budget then
    kind = 3
  end
end

local function reply(allowed, arrivals)
  local out = {allowed, kind, index, retry, in_flight, spent, held}
  for i = 1, n do
    local tat = arrivals[i] or {-1, 0}
    out[#out + 1] = tat[1]
    out[#out + 1] = tat[2]
  end
  return out
end

if kind ~= 0 then return reply(0, tats) end
if dry then return reply(1, tats) end

for i = 1, n do store_tat(KEYS[4 + i], new_tats[i], limits[i]) end
local expiry = now + ttl
if lease_limit >= 0 then
  redis.call('ZADD', KEYS[2], int(expiry), rid)
  if redis.call('PTTL', KEYS[2]) < ttl + GRACE then redis.call('PEXPIRE', KEYS[2], int(ttl + GRACE)) end
  in_flight = in_flight + 1
end
local reserved = 0
if budget >= 0 then
  reserved = amount
  add(KEYS[3], 'held', reserved)
  redis.call('ZADD', KEYS[4], int(expiry), int(reserved) .. ':' .. rid)
  expire_ledger(KEYS[3], KEYS[4], tonumber(ARGV[8]))
  held = held + amount
end
-- the ticket's logical expiry is judged by `now`, like everything else; the TTL only collects garbage. With the
-- usage ledger, it also says who the call is for, should its hold expire (the sweep records it from here).
if lg then
  redis.call('HSET', KEYS[1], 'amt', int(reserved), 'exp', int(now + 2 * ttl), 'q', lg.q, 'k', lg.k, 'u', lg.u, 'm', lg.m)
else
  redis.call('HSET', KEYS[1], 'amt', int(reserved), 'exp', int(now + 2 * ttl))
end
redis.call('PEXPIRE', KEYS[1], int(2 * ttl + GRACE))
return reply(1, new_tats)
"""

# KEYS: ticket, lease zset, ledger hash, holds zset, then one key per token limit.
# ARGV: now_ms, reservation id, actual amount, has lease (0|1), has credits (0|1), ledger expire-at (0 = keep),
#       the usage ledger's block (LEDGER_ARGS), the record's outcome, provider, deployment, tokens in, tokens out,
#       images, seconds ms, the budget alerts' block (ALERT_ARGS), then per token limit: limit,
#       (actual − estimated tokens)·T as (whole ms, rem).
# Reply: {1, alerts claimed} if settled now (its record written), {0, 0} if it was already settled (or its ticket
#        expired): no record.
_SETTLE_BODY = r"""
local rid = ARGV[2]
local lg = read_ledger(6)
local u = 6 + LEDGER_ARGS  -- the record's own fields
local a = u + 7  -- the alerts' block
local ticket = redis.call('HMGET', KEYS[1], 'amt', 'exp')
if (not ticket[1]) or (not ticket[2]) or tonumber(ticket[2]) <= now then  -- gone, expired or a tombstone
  redis.call('DEL', KEYS[1])
  return {0, 0}
end
local reserved = tonumber(ticket[1])
local amount = tonumber(ARGV[3])
local limits, new_tats = {}, {}
for i = 5, #KEYS do
  local base = a + ALERT_ARGS + (i - 5) * 3
  local limit = tonumber(ARGV[base + 1])
  limits[i] = limit
  new_tats[i] = shifted(start_of(read_tat(KEYS[i], limit)), tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3]), limit)
end

if ARGV[4] == '1' then redis.call('ZREM', KEYS[2], rid) end
local credits, late, fired = amount, 0, 0  -- without a budget, the record carries the call's price
if ARGV[5] == '1' then
  sweep(KEYS[3], KEYS[4], lg)
  if redis.call('ZREM', KEYS[4], int(reserved) .. ':' .. rid) == 1 then
    -- the hold was there, so both keys still carry the expiry its admit gave them: no PEXPIREAT needed
    add(KEYS[3], 'held', -reserved)
    add(KEYS[3], 'spent', amount)
  else
    -- the hold expired and was charged at `reserved`: correct that charge to the actual amount
    add(KEYS[3], 'spent', amount - reserved)
    credits, late = amount - reserved, 1
    expire_ledger(KEYS[3], KEYS[4], tonumber(ARGV[6]))
  end
  fired = claim_alerts(KEYS[3], lg, a)
end
redis.call('DEL', KEYS[1])  -- after the sweep, which may record this very call's expired hold from it
if lg then
  record(lg, {id = rid, request_id = lg.q, key = lg.k, user = lg.u, model = lg.m, provider = ARGV[u + 2],
    deployment = ARGV[u + 3], tokens_in = tonumber(ARGV[u + 4]), tokens_out = tonumber(ARGV[u + 5]),
    images = tonumber(ARGV[u + 6]), seconds_ms = tonumber(ARGV[u + 7]), credits = credits, reserved = reserved,
    outcome = ARGV[u + 1], late = late})
end
for i = 5, #KEYS do store_tat(KEYS[i], new_tats[i], limits[i]) end
return {1, fired}
"""
SETTLE = _COMMON + _SETTLE_BODY

# Undo an admit whose answer was lost: settle it at 0 (if it ran) and leave a tombstone in its ticket key, so
# that the admit, if it arrives later, takes nothing. KEYS and ARGV: those of SETTLE with amount and tokens 0,
# then the tombstone's lifetime in ms. Reply: 1 if it undid a taken admit, else 0.
CANCEL = _COMMON + "local function settle()\n" + _SETTLE_BODY + r"""end
local undone = settle()[1]
local tombstone_ms = tonumber(ARGV[#ARGV])
redis.call('HSET', KEYS[1], 'cancelled', '1', 'exp', int(now + tombstone_ms))
redis.call('PEXPIRE', KEYS[1], int(tombstone_ms + GRACE))
return undone
"""

# KEYS: ticket, lease zset, ledger hash (unused: the key layout of SETTLE), holds zset.
# ARGV: now_ms, reservation id, ttl_ms, has lease (0|1), has credits (0|1).
# Reply: 1 if renewed; 0 if settled, or if its lease or hold already expired (never revived: it was charged).
RENEW = _PRELUDE + r"""
local now, rid, ttl = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local ticket = redis.call('HMGET', KEYS[1], 'amt', 'exp')
if (not ticket[1]) or (not ticket[2]) or tonumber(ticket[2]) <= now then return 0 end  -- tombstones too
local hold = ticket[1] .. ':' .. rid
local function alive(key, member)
  local expiry = redis.call('ZSCORE', key, member)
  return expiry and tonumber(expiry) > now
end
if ARGV[4] == '1' and not alive(KEYS[2], rid) then return 0 end
if ARGV[5] == '1' and not alive(KEYS[4], hold) then return 0 end
local expiry = now + ttl
if ARGV[4] == '1' then
  redis.call('ZADD', KEYS[2], 'XX', int(expiry), rid)
  if redis.call('PTTL', KEYS[2]) < ttl + GRACE then redis.call('PEXPIRE', KEYS[2], int(ttl + GRACE)) end
end
if ARGV[5] == '1' then redis.call('ZADD', KEYS[4], 'XX', int(expiry), hold) end
-- the ticket must outlive the renewed hold, so that the final settle still finds it
redis.call('HSET', KEYS[1], 'exp', int(now + 2 * ttl))
redis.call('PEXPIRE', KEYS[1], int(2 * ttl + GRACE))
return 1
"""

# KEYS: ledger hash. ARGV: now_ms, micro-credits to take off `spent` (negative: add), ledger expire-at (0 = keep),
#       the usage ledger's block (LEDGER_ARGS), then the record's id, reason and actor.
# Reply: the new `spent`. The ledger record (outcome `topup` or `adjustment`) is written in the same step.
ADJUST = _COMMON + r"""
local delta = tonumber(ARGV[2])
local lg = read_ledger(3)
local o = 3 + LEDGER_ARGS
local spent = redis.call('HINCRBY', KEYS[1], 'spent', int(-delta))
if tonumber(ARGV[3]) > 0 then redis.call('PEXPIREAT', KEYS[1], int(tonumber(ARGV[3]))) end
if lg then
  local outcome = 'adjustment'
  if delta > 0 then outcome = 'topup' end
  record(lg, {id = ARGV[o + 1], request_id = lg.q, key = '', user = '', model = '', provider = '', deployment = '',
    tokens_in = 0, tokens_out = 0, images = 0, seconds_ms = 0, credits = -delta, reserved = 0, outcome = outcome,
    late = 0, reason = ARGV[o + 2], actor = ARGV[o + 3]})
end
return spent
"""

# KEYS: an alert outbox. ARGV: its consumer group, then the ids of entries delivered (or given up on).
# Deletes them, and the outbox once empty (AlertDelivery finds outboxes with alerts by SCAN).
ACK_ALERTS = r"""
local ids = {unpack(ARGV, 2)}
redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
redis.call('XDEL', KEYS[1], unpack(ids))
if redis.call('XLEN', KEYS[1]) == 0 then redis.call('DEL', KEYS[1]) end
return 1
"""
