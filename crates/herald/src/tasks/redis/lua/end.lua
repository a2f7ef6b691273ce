-- KEYS = task, user, queue, text, ended; ARGV = group, entry, status, response, error,
-- retention (ms), worker, task id, max ended, task key prefix. Ends the task unless
-- another worker owns it now (the ended-list part is note_ended.lua). The entry stays
-- pending, flagged `announce`, until the final `llm_status` is out (announced.lua): a
-- worker that dies in between leaves it to another worker, which sends that status.
local f = redis.call('HMGET', KEYS[1], 'status', 'worker')
local done = (not f[1]) or f[1] == 'completed' or f[1] == 'failed' or f[1] == 'cancelled'
if (not done) and f[2] and f[2] ~= ARGV[7] then
  return 0
end
if done then
  -- Ended earlier: acknowledged here unless its final status is still to go out (a
  -- stale worker must not take that from the worker announcing it).
  if redis.call('HGET', KEYS[1], 'announce') ~= '1' then
    redis.call('XACK', KEYS[3], ARGV[1], ARGV[2])
    redis.call('XDEL', KEYS[3], ARGV[2])
  end
  return 0
end
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'announce', '1')
if ARGV[3] == 'completed' then
  redis.call('HSET', KEYS[1], 'response', ARGV[4])
end
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'error', ARGV[5])
end
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('DEL', KEYS[4])
redis.call('SREM', KEYS[2], ARGV[8])
--[[note_ended]]
return 1
