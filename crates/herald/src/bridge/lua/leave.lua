-- KEYS = group keys; ARGV = one member per key.
for i = 1, #KEYS do
  redis.call('ZREM', KEYS[i], ARGV[i])
end
return #KEYS
