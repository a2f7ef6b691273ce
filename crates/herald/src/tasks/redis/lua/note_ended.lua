-- Lua appended to the scripts that end a task: notes it in KEYS[E] (the user's ended
-- list) and deletes the records of those beyond the cap. `E`, `ID`, `MAX`, `PREFIX`,
-- `TTL` are replaced by the KEYS/ARGV positions of each script.
redis.call('RPUSH', KEYS[E], ARGV[ID])
while redis.call('LLEN', KEYS[E]) > tonumber(ARGV[MAX]) do
  redis.call('DEL', ARGV[PREFIX] .. redis.call('LPOP', KEYS[E]))
end
redis.call('PEXPIRE', KEYS[E], ARGV[TTL])
