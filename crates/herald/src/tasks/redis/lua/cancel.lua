-- KEYS = task, user, queued, ended, queue; ARGV = user id, retention (ms), task id, max
-- ended, task key prefix, group (the ended-list part is note_ended.lua).
-- Returns `{outcome, status, chat_id, response, error, entry}` with outcome `none` (no
-- such task of this user), `ended`, `was_queued` (now cancelled, flagged `announce`:
-- the caller sends `llm_status cancelled`, then announced.lua removes the entry; if it
-- dies first, a worker sends it, see start.lua) or `running` (cancel flagged for its
-- worker).
local f = redis.call('HMGET', KEYS[1], 'status', 'user_id', 'chat_id', 'response', 'error', 'entry')
if (not f[1]) or f[2] ~= ARGV[1] then
  return {'none'}
end
local out = {'running', f[1], f[3], f[4] or '', f[5] or '', f[6] or ''}
if f[1] == 'completed' or f[1] == 'failed' or f[1] == 'cancelled' then
  out[1] = 'ended'
elseif f[1] == 'queued' then
  out[1] = 'was_queued'
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'announce', '1')
  -- A handed-back entry is pending and marked idle for ever, to be taken at once: it is
  -- made idle from now, so no worker takes it over (and sends the status) before the
  -- caller's own status had time to go out. (No group yet: no worker ever read it.)
  if f[6] then
    local p = redis.pcall('XPENDING', KEYS[5], ARGV[6], f[6], f[6], 1)
    if type(p) == 'table' and not p.err and #p > 0 then
      redis.call('XCLAIM', KEYS[5], ARGV[6], p[1][2], 0, f[6], 'JUSTID')
    end
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('SREM', KEYS[2], ARGV[3])
  if tonumber(redis.call('GET', KEYS[3]) or '0') > 0 then
    redis.call('DECR', KEYS[3])
  end
--[[note_ended]]
else
  redis.call('HSET', KEYS[1], 'cancel', '1')
end
return out
