-- KEYS = task, user, queue, queued; ARGV = task id, user id, chat id, prompt, model,
-- max in flight, in-flight TTL (ms), task key prefix. Returns `{accepted, queued}`.
for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local st = redis.call('HGET', ARGV[8] .. id, 'status')
  if (not st) or st == 'completed' or st == 'failed' or st == 'cancelled' then
    redis.call('SREM', KEYS[2], id)
  end
end
if redis.call('SCARD', KEYS[2]) >= tonumber(ARGV[6]) then
  return {0, 0}
end
local entry = redis.call('XADD', KEYS[3], '*', 'task', ARGV[1])
redis.call('HSET', KEYS[1], 'user_id', ARGV[2], 'chat_id', ARGV[3], 'prompt', ARGV[4],
  'model', ARGV[5], 'status', 'queued', 'attempts', 0, 'phase', 0, 'next_index', 0,
  'offset', 0, 'entry', entry)
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[7])
return {1, redis.call('INCR', KEYS[4])}
