"""A load-test client process of `experiments.serving`: OpenAI completion streams over HTTP.

The server's process would share its interpreter (its GIL) with the clients' HTTP parsing if
they ran beside it; a deployment's clients run elsewhere, so the load test starts these
processes. Protocol over stdin / stdout, one JSON line each way:

  stdin:  {"url": ".../v1/completions", "model": str, "new": int,
           "requests": [[prompt token ids, context], ...]}
  stdout: "ready" once its first request (one token) was answered, so that neither side's
          first-use costs (imports, connection setup code) fall into the timed run; after a "go"
          line on stdin it starts every request at once (each on its own connection) and prints
          {"submits": [wall-clock seconds (time.time) per request],
           "times": [[seconds after its submit of each event that carried text], ...],
           "cpu_s": the process's CPU seconds from "go" to the last event}

Wall-clock submits let the parent put all processes' requests on one time axis (perf_counter
is per process); the offsets are perf_counter differences.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import httpx


async def _stream(http: httpx.AsyncClient, spec: dict, prompt: list[int], context: str | None,
                  out: list) -> None:
  body = dict(model=spec["model"], prompt=prompt, max_tokens=spec["new"], temperature=0,
              stream=True, context=context)
  stamps = []
  submit, start = time.time(), time.perf_counter()
  async with http.stream("POST", spec["url"], json=body) as r:
    if r.status_code != 200:
      raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()}")
    async for line in r.aiter_lines():
      if line.startswith('data: {"error"'):
        raise RuntimeError(f"the stream failed: {line}")
      if line.startswith("data: {") and '"text": ""' not in line:  # text (json.dumps' spacing)
        stamps.append(time.perf_counter() - start)
  out.append((submit, stamps))


async def _run(spec: dict) -> dict:
  requests = spec["requests"]
  limits = httpx.Limits(max_connections=len(requests), max_keepalive_connections=len(requests))
  async with httpx.AsyncClient(timeout=600, limits=limits) as http:
    await _stream(http, spec | {"new": 1}, *requests[0], [])  # the warm-up
    print("ready", flush=True)
    go = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if go.strip() != "go":
      raise RuntimeError(f"expected 'go' on stdin, got {go!r}")
    out, cpu = [], time.process_time()
    await asyncio.gather(*(_stream(http, spec, p, c, out) for p, c in requests))
    cpu = time.process_time() - cpu
  return {"submits": [s for s, _ in out], "times": [t for _, t in out], "cpu_s": cpu}


def main() -> None:
  spec = json.loads(sys.stdin.readline())
  print(json.dumps(asyncio.run(_run(spec))), flush=True)


if __name__ == "__main__":
  main()
