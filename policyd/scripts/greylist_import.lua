-- One entry carried over from another greylist (`mailwarden greylist import-postgrey`): written only when
-- mailwarden has no such key yet, so an import never undoes what policyd learnt since (or an earlier run).
-- KEYS[1]  a greylist triplet hash (gl:t:...) or a client auto-whitelist hash (gl:c:...), see keys.py
-- ARGV[1]  its lifetime in seconds (> 0)
-- ARGV[2.] field, value, field, value ... (the fields greylist.lua reads and writes)
-- Returns 1 when written, 0 when the key existed.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
return 1
