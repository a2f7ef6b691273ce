-- Renews this node's claim on its running entries and reads their cancel flags.
-- KEYS = queue; ARGV = group, consumer, task key prefix, then entry, task id pairs.
-- Returns one code per pair: 0 lost (another worker owns it), 1 owned, 2 owned and
-- cancel asked, 3 ended by this worker (its final status is out and the entry was
-- acknowledged a moment before the run stops).
local out = {}
for i = 4, #ARGV, 2 do
  local entry = ARGV[i]
  local code = 0
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], entry, entry, 1)
  if #p > 0 and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, entry, 'JUSTID')
    code = 1
    if redis.call('HGET', ARGV[3] .. ARGV[i + 1], 'cancel') == '1' then
      code = 2
    end
  elseif #p == 0 then
    local f = redis.call('HMGET', ARGV[3] .. ARGV[i + 1], 'status', 'worker')
    if (f[1] == 'completed' or f[1] == 'failed' or f[1] == 'cancelled') and f[2] == ARGV[2] then
      code = 3
    end
  end
  out[#out + 1] = code
end
return out
