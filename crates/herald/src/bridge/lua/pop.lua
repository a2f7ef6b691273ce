-- KEYS = queue, in-flight backup; ARGV = most to pop. Moves up to that many of the
-- oldest messages into the backup (with their scores) and returns them as
-- `member, score, …`, like `ZPOPMIN`.
local popped = redis.call('ZPOPMIN', KEYS[1], ARGV[1])
for i = 1, #popped, 2 do
  redis.call('ZADD', KEYS[2], popped[i + 1], popped[i])
end
if #popped > 0 then
  redis.call('EXPIRE', KEYS[2], 86400)
end
return popped
