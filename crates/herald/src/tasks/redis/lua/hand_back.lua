-- KEYS = task, queue, queued; ARGV = group, entry, worker. Gives a running task back:
-- queued again, this start not counted, and its entry marked idle so the next
-- `XAUTOCLAIM` of any worker takes it at once. Only a task still running, and this
-- worker's: one whose end was recorded (its reply lost, say) is not run again.
local f = redis.call('HMGET', KEYS[1], 'status', 'worker')
if f[1] ~= 'running' or f[2] ~= ARGV[3] then
  return 0
end
redis.call('HINCRBY', KEYS[1], 'attempts', -1)
redis.call('HSET', KEYS[1], 'status', 'queued')
redis.call('HDEL', KEYS[1], 'worker')
redis.call('INCR', KEYS[3])
redis.call('XCLAIM', KEYS[2], ARGV[1], ARGV[3], 0, ARGV[2], 'IDLE', 3600000000, 'JUSTID')
return 1
