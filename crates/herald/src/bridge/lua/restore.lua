-- KEYS = queue, in-flight backup. channels_redis's cleanup script: puts every message
-- still in the backup back into the queue (with its original score) and deletes the
-- backup. Returns how many.
local backed_up = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
for i = #backed_up, 1, -2 do
  redis.call('ZADD', KEYS[1], backed_up[i], backed_up[i - 1])
end
redis.call('DEL', KEYS[2])
return #backed_up / 2
