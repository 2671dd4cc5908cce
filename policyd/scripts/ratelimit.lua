-- Sliding-window rate limits, all limits of one request checked (and counted) in one atomic step.
-- The window is approximated from two fixed buckets (this one and the previous one, weighted by how much
-- of it still overlaps the sliding window): O(1) memory per key, exact while the previous bucket is empty.
-- KEYS[1..n]    one bucket hash per limit (i = bucket index, c = count, p = previous bucket's count)
-- KEYS[n+1..2n] one override per limit and key (`mailwarden ratelimit override`): "exempt" or a new max
-- KEYS[2n+1..3n] one "notified" marker per limit and key: set at the first refusal of a window, so the
--               user and the admin are told once per window, not once per message
-- KEYS[3n+1]    the rate-limit event stream (read by the phish detector)
-- ARGV[1] now   ARGV[2] stream cap, then per limit (6 values): window seconds, max, amount,
--         commit (1: add the amount when every limit has room; 0: only check that it would fit), name, key value
-- Returns {0} when every limit has room, else {position of the first limit over, its estimated count,
-- the max that applied, 1 if this is the window's first refusal for that key (notify) else 0}.
local now, cap = tonumber(ARGV[1]), tonumber(ARGV[2])
local n = (#KEYS - 1) / 3
local events = KEYS[3 * n + 1]
local state = {}
for i = 1, n do
  local base = 2 + (i - 1) * 6
  local window, max, amount = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
  local override = redis.call('GET', KEYS[n + i])
  if override == 'exempt' then
    amount, max = 0, math.huge
  elseif override and tonumber(override) then
    max = tonumber(override)
  end
  local index = math.floor(now / window)
  local h = redis.call('HMGET', KEYS[i], 'i', 'c', 'p')
  local stored, cur, prev = tonumber(h[1]), tonumber(h[2]) or 0, tonumber(h[3]) or 0
  if stored == nil then cur, prev = 0, 0
  elseif stored == index - 1 then prev, cur = cur, 0
  elseif stored ~= index then cur, prev = 0, 0 end
  local elapsed = now - index * window
  local estimate = prev * (window - elapsed) / window + cur
  if estimate + amount > max then
    redis.call('XADD', events, 'MAXLEN', '~', cap, '*', 'limit', ARGV[base + 5], 'key', ARGV[base + 6],
               'count', string.format('%.0f', estimate), 'max', max, 'at', ARGV[1])
    local first = redis.call('SET', KEYS[2 * n + i], ARGV[1], 'NX', 'EX', math.ceil(window))
    return {i, string.format('%.0f', estimate), tostring(max), first and 1 or 0}
  end
  if ARGV[base + 4] == '1' then state[#state + 1] = {KEYS[i], index, cur + amount, prev, window} end
end
for _, s in ipairs(state) do
  redis.call('HSET', s[1], 'i', s[2], 'c', s[3], 'p', s[4])
  redis.call('EXPIRE', s[1], math.ceil(s[5] * 2))
end
return {0}
