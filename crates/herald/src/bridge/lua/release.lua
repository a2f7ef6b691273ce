-- KEYS = lease; ARGV = node. Gives the lease up if this node holds it.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
