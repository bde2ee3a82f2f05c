-- driftsafe bench api: the one wrk script of every phase.
--   wrk -t2 -c32 -d10s -s api.lua http://HOST:PORT -- METHOD PATH KEY BODY NONCE
-- BODY "" sends none. NONCE "" sends the same request every time; otherwise each request carries
-- its own Idempotency-Key: NONCE-<thread>-<counter>, so no two creations are replays.
-- done() prints one line, "BENCH_JSON {...}": status counts of every thread, wrk's socket errors
-- and latency percentiles in microseconds.

local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function init(args)
  method, path, key, body, nonce = args[1], args[2], args[3], args[4], args[5]
  statuses = {}
  counter = 0
  headers = {["Authorization"] = "Bearer " .. key}
  if body ~= nil and body ~= "" then
    headers["Content-Type"] = "application/json"
  else
    body = nil
  end
  if nonce == nil or nonce == "" then
    fixed = wrk.format(method, path, headers, body)
  end
end

function request()
  if fixed then
    return fixed
  end
  counter = counter + 1
  headers["Idempotency-Key"] = nonce .. "-" .. tid .. "-" .. counter
  return wrk.format(method, path, headers, body)
end

function response(status, hdrs, resp_body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local codes = {}
  for _, t in ipairs(threads) do
    for code, n in pairs(t:get("statuses") or {}) do
      codes[code] = (codes[code] or 0) + n
    end
  end
  local parts = {}
  for code, n in pairs(codes) do
    table.insert(parts, string.format('"%d": %d', code, n))
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"duration_us": %d, "requests": %d, "bytes": %d, "statuses": {%s}, ' ..
    '"socket_errors": {"connect": %d, "read": %d, "write": %d, "timeout": %d}, ' ..
    '"latency_us": {"min": %d, "mean": %.1f, "p50": %d, "p90": %d, "p99": %d, "max": %d}}\n',
    summary.duration, summary.requests, summary.bytes, table.concat(parts, ", "),
    e.connect, e.read, e.write, e.timeout,
    latency.min, latency.mean, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max))
end
