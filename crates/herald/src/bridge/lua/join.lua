-- KEYS = group keys; ARGV = now (seconds, float), group expiry (s), then one member per
-- key. Adds each member with the current time as its score, as `group_add` does, and
-- extends (never shortens) the group's expiry.
local expiry = tonumber(ARGV[2])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], ARGV[1], ARGV[i + 2])
  if redis.call('TTL', KEYS[i]) < expiry then
    redis.call('EXPIRE', KEYS[i], expiry)
  end
end
return #KEYS
