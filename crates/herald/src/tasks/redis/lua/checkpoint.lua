-- KEYS = task, text; ARGV = phase, delta, next index, offset, worker, TTL (ms), the
-- text's length (bytes) before `delta`. Raises the recorded progress; only the task's
-- current worker may. Returns 1, 0 (another worker owns the task), or 2 when the
-- recorded text is not what precedes `delta` (a save was lost, or the task was taken
-- over): nothing is recorded then, and the worker rewrites the whole text
-- (rewrite.lua), so the text never has a hole another worker would resume from.
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[5] then
  return 0
end
if ARGV[2] ~= '' then
  if redis.call('STRLEN', KEYS[2]) ~= tonumber(ARGV[7]) then
    return 2
  end
  redis.call('APPEND', KEYS[2], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[6])
end
for i, field in ipairs({'phase', 'next_index', 'offset'}) do
  local v = ({ARGV[1], ARGV[3], ARGV[4]})[i]
  if tonumber(v) > tonumber(redis.call('HGET', KEYS[1], field) or '0') then
    redis.call('HSET', KEYS[1], field, v)
  end
end
return 1
