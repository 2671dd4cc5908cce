-- Greylisting decision with Postgrey 1.37's semantics, atomic across every policyd sharing this Redis.
-- KEYS[1]  triplet hash   (f = first seen, l = last seen; o, s, r = the triplet, for the CLI;
--          p = 1 when let through by hand with `mailwarden greylist pass`, f and l stay the real sightings)
-- KEYS[2]  client auto-whitelist hash (n = passes counted, l = last counted)
-- KEYS[3]  expectation for the sender's domain, KEYS[4] for the domain and this recipient (set by
--          `mailwarden greylist expect`; while either exists the triplet is not greylisted)
-- KEYS[5]  client pass of the client's network (set by `mailwarden greylist pass --client IP`; while it
--          exists every triplet of the network passes and is remembered as passed by hand)
-- ARGV[1]  now (epoch seconds)      ARGV[2] delay            ARGV[3] retry_window
-- ARGV[4]  max_age                  ARGV[5] auto-whitelist threshold (0 = off)
-- ARGV[6]  origin (client network or spf:domain), ARGV[7] normalised sender, ARGV[8] recipient
-- Returns {status, detail}: 'expected' (inside an expect window; the window's JSON, with its reason),
-- 'client_pass' (a client pass is open), 'awl' (client auto-whitelisted; passes counted),
-- 'new' / 'early' (defer; seconds left), 'first_pass' (passes for the first time; seconds it was
-- delayed), 'pass' (seen and passed before, or passed by hand).
local now, delay, retry_window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local max_age, awl = tonumber(ARGV[4]), tonumber(ARGV[5])

local window = redis.call('GET', KEYS[4])
if not window then window = redis.call('GET', KEYS[3]) end
if window then
  return {'expected', window}
end

local triplet = redis.call('HMGET', KEYS[1], 'f', 'l', 'p')
local first, last, by_hand = tonumber(triplet[1]), tonumber(triplet[2]), triplet[3] == '1'

if redis.call('EXISTS', KEYS[5]) == 1 then
  if not first or first > now then first = now end
  redis.call('HSET', KEYS[1], 'f', first, 'l', now, 'p', 1, 'o', ARGV[6], 's', ARGV[7], 'r', ARGV[8])
  redis.call('EXPIRE', KEYS[1], math.ceil(max_age))
  return {'client_pass', '0'}
end

if awl > 0 then
  local client = redis.call('HMGET', KEYS[2], 'n', 'l')
  local count, counted = tonumber(client[1]), tonumber(client[2])
  if count and count >= awl then
    -- counted at most once an hour, as postgrey, so the entry lives max_age after the last use
    if now >= counted + 3600 or counted > now then
      redis.call('HSET', KEYS[2], 'n', count + 1, 'l', now)
      redis.call('EXPIRE', KEYS[2], math.ceil(max_age))
    end
    return {'awl', tostring(count)}
  end
end

local passed_before = by_hand
if first then
  if last and last - first >= delay then
    passed_before = true
  elseif not passed_before and now - first > retry_window then
    first = now          -- retried too late: starts over
  end
  if first > now then first = now end   -- clock went backwards
else
  first = now
end
redis.call('HSET', KEYS[1], 'f', first, 'l', now, 'o', ARGV[6], 's', ARGV[7], 'r', ARGV[8])

if passed_before then
  redis.call('EXPIRE', KEYS[1], math.ceil(max_age))
  return {'pass', tostring(now - first)}
end

local missing = delay - (now - first)
if missing > 0 then
  redis.call('EXPIRE', KEYS[1], math.ceil(retry_window))
  if first == now then return {'new', tostring(missing)} end
  return {'early', tostring(missing)}
end

redis.call('EXPIRE', KEYS[1], math.ceil(max_age))

if awl > 0 then
  local client = redis.call('HMGET', KEYS[2], 'n', 'l')
  local counted = tonumber(client[2])
  if not counted or now >= counted + 3600 then
    redis.call('HSET', KEYS[2], 'n', (tonumber(client[1]) or 0) + 1, 'l', now)
    redis.call('EXPIRE', KEYS[2], math.ceil(max_age))
  end
end
return {'first_pass', tostring(now - first)}
