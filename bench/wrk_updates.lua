-- wrk script: POST distinct Telegram text updates to /webhook, then print the figures as one JSON line.
-- Arguments (after --): first update id, secret token. Each wrk thread takes its own id range.
local threads = {}
local first_id = 1
local secret = ""

function setup(thread)
  thread:set("thread_index", #threads)
  table.insert(threads, thread)
end

function init(args)
  first_id = tonumber(args[1] or "1")
  secret = args[2] or ""
  next_id = first_id + thread_index * 100000000
end

function request()
  local id = next_id
  next_id = next_id + 1
  local user = 1 + id % 500
  local body = string.format(
    '{"update_id":%d,"message":{"message_id":%d,"date":1700000000,"chat":{"id":%d,"type":"private"},' ..
    '"from":{"id":%d,"is_bot":false,"first_name":"B"},"text":"m%d"}}', id, id, user, user, id)
  return wrk.format("POST", nil, {["Content-Type"] = "application/json",
                                  ["X-Telegram-Bot-Api-Secret-Token"] = secret}, body)
end

function done(summary, latency, requests)
  local non2xx = summary.errors.status
  io.write(string.format(
    '{"requests":%d,"seconds":%.3f,"p50_ms":%.2f,"p99_ms":%.2f,"max_ms":%.2f,"non2xx":%d,"socket_errors":%d}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000, non2xx,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
