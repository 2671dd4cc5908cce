-- phishhook: remember one login (phishhook/history.py LoginHistory.remember), in one round trip.
-- KEYS[1] ph:h:<user>  the history list (newest first)
-- KEYS[2] ph:p:<user>  the user's places (hash "CC|City" -> "days:last day")
-- KEYS[3] ph:o:<place> the users seen at the place (HyperLogLog); "" when the login has no place
-- KEYS[4] ph:f:<user>  when the user was first seen
-- ARGV[1] the sighting as JSON      ARGV[2] "1": replace the newest entry (the same client again), else push
-- ARGV[3] entries kept              ARGV[4] lifetime of every key (seconds)
-- ARGV[5] the place's field ("" without a place)    ARGV[6] its new value "days:day"
-- ARGV[7] the login name (for the HyperLogLog)      ARGV[8] the login's time (epoch seconds, integer)
local ttl = tonumber(ARGV[4])
if ARGV[2] == '1' then
  redis.call('LSET', KEYS[1], 0, ARGV[1])
else
  redis.call('LPUSH', KEYS[1], ARGV[1])
  redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[3]) - 1)
end
redis.call('EXPIRE', KEYS[1], ttl)
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[2], ARGV[5], ARGV[6])
  redis.call('EXPIRE', KEYS[2], ttl)
  redis.call('PFADD', KEYS[3], ARGV[7])
  redis.call('EXPIRE', KEYS[3], ttl)
end
redis.call('SET', KEYS[4], ARGV[8], 'NX')
redis.call('EXPIRE', KEYS[4], ttl)
return 1
