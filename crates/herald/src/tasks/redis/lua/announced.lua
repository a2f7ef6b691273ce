-- KEYS = task, queue; ARGV = group, entry. The final `llm_status` of an ended task
-- went out: its entry is acknowledged and the `announce` flag end.lua set is cleared.
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
redis.call('HDEL', KEYS[1], 'announce')
return 1
