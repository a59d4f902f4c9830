-- aproxy benchmark: one fixed request (absolute-form target through the proxy), JSON summary.
-- Environment: APB_TARGET (request target), APB_HOST (Host), APB_CLOSE ("1": Connection:
-- close), APB_DELAY_MS (a pause before each request on a connection: a paced load),
-- APB_OUT (file for the summary written by done()).
wrk.method = "GET"
wrk.path = os.getenv("APB_TARGET")
wrk.headers["Host"] = os.getenv("APB_HOST")
wrk.headers["User-Agent"] = "aproxy-bench-wrk"
if os.getenv("APB_CLOSE") == "1" then
   wrk.headers["Connection"] = "close"
end
local pause = tonumber(os.getenv("APB_DELAY_MS") or "0")
if pause > 0 then
   function delay()
      return pause
   end
end

function done(summary, latency, requests)
   local out = io.open(os.getenv("APB_OUT"), "w")
   local e = summary.errors
   out:write(string.format(
      '{"duration_us": %d, "requests": %d, "bytes": %d, "connect": %d, "read": %d, ' ..
      '"write": %d, "status": %d, "timeout": %d, "p50_us": %d, "p99_us": %d, "max_us": %d}\n',
      summary.duration, summary.requests, summary.bytes, e.connect, e.read, e.write,
      e.status, e.timeout, latency:percentile(50), latency:percentile(99), latency.max))
   out:close()
end
