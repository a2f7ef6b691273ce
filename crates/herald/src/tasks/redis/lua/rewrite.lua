-- KEYS = task, text; ARGV = phase, text, next index, offset, worker, TTL (ms).
-- Replaces the recorded text and next index (a repair, a takeover that found messages
-- sent but not recorded, or a restarted answer) and raises phase and offset; only the
-- task's current worker may.
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[5] then
  return 0
end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[6])
redis.call('HSET', KEYS[1], 'next_index', ARGV[3])
for i, field in ipairs({'phase', 'offset'}) do
  local v = ({ARGV[1], ARGV[4]})[i]
  if tonumber(v) > tonumber(redis.call('HGET', KEYS[1], field) or '0') then
    redis.call('HSET', KEYS[1], field, v)
  end
end
return 1
