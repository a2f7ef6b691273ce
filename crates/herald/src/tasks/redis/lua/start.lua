-- KEYS = task, queued, queue, text; ARGV = group, entry, consumer, max attempts.
-- Returns `{action, user_id, chat_id, prompt, model, phase, next_index, offset, text,
-- queued, attempts, status}` with action `run`, `cancel` (asked while its last worker
-- ran it), `exhausted`, `announce` (ended, but whoever ended it died before its final
-- `llm_status` was out: this one sends it), `wait` (ended and not yet announced, read
-- for the first time: whoever ended it may be sending that status now, so the entry is
-- left pending, to be taken over as `announce` once idle) or `skip` (ended or gone; the
-- entry is acknowledged).
local f = redis.call('HMGET', KEYS[1], 'status', 'cancel', 'user_id', 'chat_id', 'prompt',
  'model', 'phase', 'next_index', 'offset')
local st = f[1]
if (not st) or st == 'completed' or st == 'failed' or st == 'cancelled' then
  if st and redis.call('HGET', KEYS[1], 'announce') == '1' then
    local p = redis.call('XPENDING', KEYS[3], ARGV[1], ARGV[2], ARGV[2], 1)
    if #p > 0 and tonumber(p[1][4]) <= 1 then
      return {'wait'}
    end
    redis.call('HSET', KEYS[1], 'worker', ARGV[3])
    return {'announce', f[3], f[4], '', '', f[7], f[8], f[9], '', redis.call('GET', KEYS[2]) or '0', 0, st}
  end
  redis.call('XACK', KEYS[3], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[3], ARGV[2])
  return {'skip'}
end
if st == 'queued' and tonumber(redis.call('GET', KEYS[2]) or '0') > 0 then
  redis.call('DECR', KEYS[2])
end
local queued = redis.call('GET', KEYS[2]) or '0'
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[3])
local action = 'run'
local attempts = 0
if f[2] == '1' then
  action = 'cancel'
else
  attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  if attempts > tonumber(ARGV[4]) then
    action = 'exhausted'
  end
end
local text = redis.call('GET', KEYS[4]) or ''
return {action, f[3], f[4], f[5], f[6], f[7], f[8], f[9], text, queued, attempts}
