-- Greylisting decision with Postgrey 1.37's semantics, atomic across every policyd sharing this Redis.
-- KEYS[1]  triplet hash   (f = first seen, l = last seen; o, s, r = the triplet, for the CLI)
-- KEYS[2]  client auto-whitelist hash (n = passes counted, l = last counted)
-- KEYS[3]  expectation for the sender's domain, KEYS[4] for the domain and this recipient (set by
--          `mailwarden greylist expect`; while either exists the triplet is not greylisted)
-- ARGV[1]  now (epoch seconds)      ARGV[2] delay            ARGV[3] retry_window
-- ARGV[4]  max_age                  ARGV[5] auto-whitelist threshold (0 = off)
-- ARGV[6]  origin (client network or spf:domain), ARGV[7] normalised sender, ARGV[8] recipient
-- Returns {status, seconds}: 'expected' (inside an expect window), 'awl' (client auto-whitelisted),
-- 'new' / 'early' (defer; seconds left), 'first_pass' (passes for the first time; seconds it was
-- delayed), 'pass' (seen and passed before).
local now, delay, retry_window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local max_age, awl = tonumber(ARGV[4]), tonumber(ARGV[5])

if redis.call('EXISTS', KEYS[3], KEYS[4]) > 0 then
  return {'expected', '0'}
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

local triplet = redis.call('HMGET', KEYS[1], 'f', 'l')
local first, last = tonumber(triplet[1]), tonumber(triplet[2])
local passed_before = false
if first then
  if last - first >= delay then
    passed_before = true
  elseif now - first > retry_window then
    first = now          -- retried too late: starts over
  end
  if first > now then first = now end   -- clock went backwards
else
  first = now
end
redis.call('HSET', KEYS[1], 'f', first, 'l', now, 'o', ARGV[6], 's', ARGV[7], 'r', ARGV[8])

local missing = delay - (now - first)
if missing > 0 then
  redis.call('EXPIRE', KEYS[1], math.ceil(retry_window))
  if first == now then return {'new', tostring(missing)} end
  return {'early', tostring(missing)}
end

redis.call('EXPIRE', KEYS[1], math.ceil(max_age))
if passed_before then return {'pass', tostring(now - first)} end

if awl > 0 then
  local client = redis.call('HMGET', KEYS[2], 'n', 'l')
  local counted = tonumber(client[2])
  if not counted or now >= counted + 3600 then
    redis.call('HSET', KEYS[2], 'n', (tonumber(client[1]) or 0) + 1, 'l', now)
    redis.call('EXPIRE', KEYS[2], math.ceil(max_age))
  end
end
return {'first_pass', tostring(now - first)}
