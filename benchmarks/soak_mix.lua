-- wrk script for benchmarks/soak: a fixed mix of requests, each checked, stopping at a count.
--
-- Every thread draws request kinds from one weighted cycle (deterministic, no RNG):
--   get     GET /            keep-alive, 12-byte body
--   big     GET /big         keep-alive, 256 KiB body
--   close   GET / with "Connection: close": a new connection per request
--   upload  POST /upload     keep-alive, 64 KiB body
--   flaky   GET /flaky/      group of a good server and one that closes without answering:
--                            the proxy retries the GET on the good one, so 200
--   broken  GET /broken/     the only server closes without answering: 502
--   dead    GET /dead/       the only server refuses connections: 502
-- A response is "expected" when it is a 200 with the right body length, or a 502 naming the
-- upstream group "broken" or "dead". Anything else is counted as unexpected, with a sample.
-- Each thread stops after `per_thread` responses (set by soak.py through the env var) and
-- leaves a mark file in $SOAK_MARK_DIR.

local kinds = {}
local weights = {
  {"get", 60}, {"big", 4}, {"close", 10}, {"upload", 12},
  {"flaky", 6}, {"broken", 4}, {"dead", 4},
}
for _, kw in ipairs(weights) do
  for _ = 1, kw[2] do kinds[#kinds + 1] = kw[1] end
end

local upload_body = string.rep("u", 65536)
local requests = {}

local threads = {}

function setup(thread)
  thread:set("id", #threads + 1)
  threads[#threads + 1] = thread
end

function init(args)
  per_thread = tonumber(os.getenv("SOAK_PER_THREAD") or "1000")
  -- a thread-specific starting point so threads do not move in lockstep
  pos = (id * 37) % #kinds
  finished = 0
  sent = {}
  got = {}
  unexpected = 0
  sample = ""
  local h = {["Host"] = "soak"}
  requests = {
    get = wrk.format("GET", "/", h),
    big = wrk.format("GET", "/big", h),
    close = wrk.format("GET", "/", {["Host"] = "soak", ["Connection"] = "close"}),
    upload = wrk.format("POST", "/upload", h, upload_body),
    flaky = wrk.format("GET", "/flaky/x", h),
    broken = wrk.format("GET", "/broken/x", h),
    dead = wrk.format("GET", "/dead/x", h),
  }
  for k, _ in pairs(requests) do sent[k] = 0 end
end

function request()
  pos = pos % #kinds + 1
  local kind = kinds[pos]
  sent[kind] = sent[kind] + 1
  return requests[kind]
end

local function expected(status, body)
  if status == 200 then
    local n = #body
    return n == 12 or n == 262144 or n == 3
  end
  if status == 502 then
    return string.find(body, 'upstream "broken"', 1, true) ~= nil
        or string.find(body, 'upstream "dead"', 1, true) ~= nil
  end
  return false
end

function response(status, headers, body)
  finished = finished + 1
  got[status] = (got[status] or 0) + 1
  if not expected(status, body) then
    unexpected = unexpected + 1
    if #sample < 400 then
      sample = sample .. status .. ":" .. string.sub(body, 1, 120):gsub("\n", " ") .. " | "
    end
  end
  if finished == per_thread then
    -- wrk's main thread sleeps out its -d duration whatever the threads do: leave a mark
    -- so that soak.py interrupts it (SIGINT) once every thread is done
    local mark = io.open(os.getenv("SOAK_MARK_DIR") .. "/thread-" .. id, "w")
    if mark then mark:close() end
    wrk.thread:stop()
  end
end

function done(summary, latency, reqs)
  local out = {}
  local total_unexpected = 0
  local sent_total = {}
  local got_total = {}
  local samples = ""
  for _, t in ipairs(threads) do
    total_unexpected = total_unexpected + t:get("unexpected")
    samples = samples .. (t:get("sample") or "")
    for k, v in pairs(t:get("sent")) do sent_total[k] = (sent_total[k] or 0) + v end
    for k, v in pairs(t:get("got")) do
      local key = tostring(k)
      got_total[key] = (got_total[key] or 0) + v
    end
  end
  local function obj(tbl)
    local parts = {}
    for k, v in pairs(tbl) do parts[#parts + 1] = string.format('"%s": %d', k, v) end
    return "{" .. table.concat(parts, ", ") .. "}"
  end
  local e = summary.errors
  io.write(string.format(
    'SOAK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, "read": %d, '
      .. '"write": %d, "timeout": %d, "status": %d, "unexpected": %d, "sent": %s, '
      .. '"statuses": %s, "p50": %.1f, "p99": %.1f, "max": %.1f, "sample": "%s"}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.timeout,
    e.status, total_unexpected, obj(sent_total), obj(got_total),
    latency:percentile(50), latency:percentile(99), latency.max,
    (samples:gsub('[%c\\"\128-\255]', "?"))))
end
