"""Closed-loop HTTP load with wrk (a C load generator), for bench/ranking.py `--driver wrk`.

The same load as bench/ranking.py's httpx driver (`load`): `clients` connections post back to back for
`seconds`, request k for user users[k % len(users)] in session f"bench-{k % clients}-{k % 7}", stamped with the
bench's `now_ms` (the world's data clock, bench/ranking.py `_body`), 200 candidates. wrk's Lua `request()`
builds each body from a user list written to a temp file; `response()` counts status codes and `served_by`
and keeps the server's own pipeline total (`latency_breakdown_ms.total`); `done()` prints one JSON line with
wrk's latency percentiles (measured from each request's send to its response, like the httpx driver: a
closed loop, so no open-loop claim), the counts and transport errors. The client's CPU time comes from the
kernel's rusage of the wrk process (os.wait4), so the bench can say what share of the cores the load took.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

MARK = "KAIROS_WRK_JSON "

# __USERS__, __NOW_MS__, __CLIENTS__, __THREADS__ and __MARK__ are filled in by wrk_load; users are written JSON-quoted, one a line
LUA = r"""
local users = {}
for line in io.lines("__USERS__") do users[#users + 1] = line end
local now_ms, clients = __NOW_MS__, __CLIENTS__
local threads, next_id = {}, 0

function setup(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  k = tid            -- this thread's request counter: threads take every n-th request number
  step = __THREADS__
  codes, served, totals = {}, {}, {}
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  local user = users[(k % #users) + 1]
  local body = string.format(
    '{"user_id":%s,"surface":"home_feed","context":{"session_id":"bench-%d-%d","device_type":"mobile",' ..
    '"timestamp_ms":%d,"geo_region":"eu"},"request_config":{"num_results":10,"candidate_pool_size":200,' ..
    '"max_latency_ms":100}}', user, k % clients, k % 7, now_ms)
  k = k + step
  return wrk.format("POST", "/v1/personalize", nil, body)
end

function response(status, headers, body)
  codes[status] = (codes[status] or 0) + 1
  if status == 200 then
    local path = string.match(body, '"served_by":"([^"]*)"') or "?"
    served[path] = (served[path] or 0) + 1
    local total = string.match(body, '"total":([%d%.eE+-]+)')
    if total then totals[#totals + 1] = tonumber(total) end
  else
    local path = "http_" .. status
    served[path] = (served[path] or 0) + 1
  end
end

local function enc(v)
  if type(v) == "table" then
    local parts, is_array = {}, (#v > 0 or next(v) == nil)
    if is_array then
      for _, x in ipairs(v) do parts[#parts + 1] = enc(x) end
      return "[" .. table.concat(parts, ",") .. "]"
    end
    for key, x in pairs(v) do parts[#parts + 1] = string.format("%q", tostring(key)) .. ":" .. enc(x) end
    return "{" .. table.concat(parts, ",") .. "}"
  elseif type(v) == "string" then
    return string.format("%q", v)
  else
    return string.format("%.17g", v)
  end
end

function done(summary, latency, requests)
  local all_codes, all_served, all_totals = {}, {}, {}
  for _, t in ipairs(threads) do
    for key, n in pairs(t:get("codes")) do all_codes[tostring(key)] = (all_codes[tostring(key)] or 0) + n end
    for key, n in pairs(t:get("served")) do all_served[key] = (all_served[key] or 0) + n end
    for _, x in ipairs(t:get("totals")) do all_totals[#all_totals + 1] = x end
  end
  local out = {
    requests = summary.requests, duration_us = summary.duration,
    errors = {connect = summary.errors.connect, read = summary.errors.read, write = summary.errors.write,
              status = summary.errors.status, timeout = summary.errors.timeout},
    p50_us = latency:percentile(50), p95_us = latency:percentile(95), p99_us = latency:percentile(99),
    max_us = latency.max, mean_us = latency.mean,
    codes = all_codes, served_by = all_served, pipeline_totals = all_totals,
  }
  io.write("__MARK__" .. enc(out) .. "\n")
end
"""


def available() -> str | None:
    return shutil.which("wrk")


def script(users_path: Path, now_ms: int, clients: int, threads: int) -> str:
    return (LUA.replace("__USERS__", str(users_path)).replace("__NOW_MS__", str(int(now_ms)))
            .replace("__CLIENTS__", str(int(clients))).replace("__THREADS__", str(int(threads)))
            .replace("__MARK__", MARK))


def parse(stdout: str) -> dict:
    """The JSON line done() printed (wrk's own summary is ignored)."""
    for line in stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise RuntimeError(f"wrk printed no {MARK.strip()} line:\n{stdout[-2000:]}")


def wrk_load(base: str, users: list[str], now_ms: int, clients: int, seconds: float, threads: int = 1) -> dict:
    """`clients` wrk connections (on `threads` wrk threads) post back to back for `seconds`; the same keys as
    bench/ranking.py `load` (no timeline), plus `client_cpu_s` (wrk's user + system CPU time) and `wall_s`."""
    exe = available()
    if exe is None:
        raise RuntimeError("wrk is not installed (apt-get install -y wrk)")
    threads = max(1, min(threads, clients))
    with tempfile.TemporaryDirectory(prefix="kairos-wrk-") as tmp:
        users_path = Path(tmp) / "users.txt"
        users_path.write_text("".join(json.dumps(str(u)) + "\n" for u in users))
        lua = Path(tmp) / "personalize.lua"
        lua.write_text(script(users_path, now_ms, clients, threads))
        out_path = Path(tmp) / "out.txt"
        duration = max(1, round(seconds))
        cmd = [exe, "-t", str(threads), "-c", str(clients), "-d", f"{duration}s", "--timeout", "10s",
               "-s", str(lua), base]
        with open(out_path, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        text = out_path.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited with {proc.returncode}: {' '.join(cmd)}\n{text[-2000:]}")
    r = parse(text)
    wall = r["duration_us"] / 1e6
    codes = {int(k): int(v) for k, v in (r["codes"] or {}).items()}
    errors = {k: int(v) for k, v in r["errors"].items() if k != "status" and v}
    transport = sum(errors.values())
    if transport:  # a socket error or timeout is a failure, counted like the httpx driver's 599
        codes[599] = codes.get(599, 0) + transport
    served = dict(r["served_by"] or {})
    if transport:
        served["transport_error"] = transport
    totals = r["pipeline_totals"]
    completed = sum(n for c, n in codes.items() if c != 599)
    return {"clients": clients, "requests": completed + transport, "rps": completed / wall if wall else float("nan"),
            "p50": r["p50_us"] / 1000, "p95": r["p95_us"] / 1000, "p99": r["p99_us"] / 1000, "codes": codes,
            "non_2xx": sum(n for c, n in codes.items() if not 200 <= c < 300),
            "pipeline_p50": float(np.percentile(totals, 50)) if totals else float("nan"),
            "served_by": served, "transport_errors": errors,
            "client_cpu_s": usage.ru_utime + usage.ru_stime, "wall_s": wall, "command": " ".join(cmd)}
