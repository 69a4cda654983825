-- fixed_window.v1
-- One fixed window per client: the window starts at the client's first counted
-- request and lasts ARGV[2] ms; at most ARGV[1] requests are counted in it.
-- KEYS[1]  counter key ({prefix}:fw1:{client}, client in a hash tag)
-- ARGV[1]  limit (integer >= 1)    ARGV[2]  window length (ms, integer >= 1)
-- returns  {allowed 0|1, remaining, ttl_ms}
-- Invariants: a rejected hit neither counts nor touches the TTL; every key
-- carries a TTL when the script returns (a key found without one is repaired).
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])

local count = tonumber(redis.call('GET', KEYS[1]) or '0')
if count >= limit then
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl < 0 then
    redis.call('PEXPIRE', KEYS[1], window)
    ttl = window
  end
  return {0, 0, ttl}
end

count = redis.call('INCR', KEYS[1])
local ttl
if count == 1 then
  redis.call('PEXPIRE', KEYS[1], window)
  ttl = window
else
  ttl = redis.call('PTTL', KEYS[1])
  if ttl < 0 then
    redis.call('PEXPIRE', KEYS[1], window)
    ttl = window
  end
end
return {1, limit - count, ttl}
