-- wrk: POST the seed's form body, a different session and participant on every request.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
local counter = 0
local thread_id = 0

function setup(thread)
  thread:set("thread_id", thread_id)
  thread_id = thread_id + 1
end

function request()
  counter = counter + 1
  local body = string.format(
    "sessionId=ATVoice_bench_%d_%d&phoneNumber=%%2B2547%08d&recordingUrl=https%%3A%%2F%%2Fvoice.africastalking.com"
    .. "%%2Frecordings%%2F%d.mp3&duration=%d&status=completed",
    thread_id, math.floor(counter / 3), counter % 100000000, counter, counter % 3600)
  return wrk.format(nil, nil, nil, body)
end
