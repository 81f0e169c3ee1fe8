"""An external agent: plays the get/rev tool task against dynamo-rl's rollout endpoint.

It knows nothing of dynamo-rl: it speaks OpenAI chat with tools through the ``openai`` SDK
(one session per episode, ``base_url`` from ``POST /v1/sessions``), runs the tools itself,
and ends each episode with its reward (``POST /v1/sessions/<id>/end``). What it re-sends
is what OpenAI agents re-send: the SDK's assistant message turned back into a dict, the tool
call arguments re-serialized (``json.dumps``: other whitespace than the model wrote).

    python examples/agents/tool_agent.py --url http://127.0.0.1:PORT --episodes 16 --group-size 4

As ``task.agent_command`` of a recipe (``examples/grpo_agent.yaml``), it plays until
stopped (``--episodes 0``); the trainer gives it ``DYNAMO_RL_ROLLOUT_URL``,
``DYNAMO_RL_GROUP_SIZE`` and ``DYNAMO_RL_MODEL``, the defaults of ``--url``,
``--group-size`` and ``--model``.

The task: a hidden 3-digit value under a one-letter key; the user asks ``get k`` (the
value) or ``rev k`` (the value reversed); tools ``get {"k"}`` and ``rev {"k"}`` answer.
Reward 1 for the right answer after the right tool's result; else half the share of the
answer's characters right at their place when a tool gave the value; else 0 (the reward of
dynamo-rl's built-in ``tool_lookup``). ``--out FILE`` appends one JSON line per episode.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import random
import signal
import string
import sys

import httpx
import openai

TOOLS = [{"type": "function", "function": {"name": name, "description": desc, "parameters": {
    "type": "object", "properties": {"k": {"type": "string", "description": "the key"}}, "required": ["k"]}}}
    for name, desc in (("get", "the value stored under a key"), ("rev", "the value stored under a key, reversed"))]


def run_tool(record: dict, name: str, arguments: str) -> str:
    if name not in ("get", "rev"):
        return f"error: unknown tool {name}"
    try:
        args = json.loads(arguments)
    except ValueError:
        return "error: arguments are not json"
    if not isinstance(args, dict) or args.get("k") != record["key"]:
        return "error: no such key"
    return record["value"] if name == "get" else record["value"][::-1]


MODEL = os.environ.get("DYNAMO_RL_MODEL", "tiny")


def ask(client: openai.OpenAI, kw: dict, stream: bool) -> dict:
    """One assistant turn: ``{"content", "tool_calls"}`` (streamed chunks put together, or not)."""
    if not stream:
        m = client.chat.completions.create(**kw).choices[0].message
        return {"content": m.content, "tool_calls": list(m.tool_calls or [])}
    content, tool_calls = "", {}
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            content += ch.delta.content or ""
            for tc in ch.delta.tool_calls or []:
                tool_calls[tc.index] = tc
    return {"content": content, "tool_calls": [tool_calls[i] for i in sorted(tool_calls)]}


def play(url: str, record: dict, group: str, seed: int, stream: bool, max_turns: int = 3) -> dict:
    with httpx.Client(timeout=60.0) as http:
        session = http.post(f"{url}/v1/sessions", json={"group": group, "metadata": record}).raise_for_status().json()
        client = openai.OpenAI(base_url=session["base_url"], api_key="unused", max_retries=0)
        messages: list[dict] = [{"role": "user", "content": f"{record['verb']} {record['key']}"}]
        expected = record["value"] if record["verb"] == "get" else record["value"][::-1]
        reward, answer, calls, got = 0.0, None, 0, set()
        for turn in range(max_turns):
            kw = dict(model=MODEL, messages=messages, tools=TOOLS, max_tokens=48, temperature=1.0,
                      seed=seed * 100 + turn)
            try:
                message = ask(client, kw, stream)
            except openai.BadRequestError as e:   # e.g. past the model's context: the episode ends
                print(f"turn refused: {e}", file=sys.stderr)
                break
            if message["tool_calls"]:
                calls += len(message["tool_calls"])
                sent = []
                for tc in message["tool_calls"]:
                    args = tc.function.arguments
                    try:
                        args = json.dumps(json.loads(args))   # re-serialized: {"k": "a"}, not {"k":"a"}
                    except ValueError:
                        pass
                    sent.append({"id": tc.id, "type": "function", "function": {"name": tc.function.name,
                                                                                "arguments": args}})
                messages.append({"role": "assistant", "content": message["content"] or "", "tool_calls": sent})
                for tc in message["tool_calls"]:
                    result = run_tool(record, tc.function.name, tc.function.arguments)
                    if not result.startswith("error"):
                        got.add(tc.function.name)
                    messages.append({"role": "tool", "tool_call_id": tc.id, "content": result})
                continue
            answer = (message["content"] or "").strip()
            if record["verb"] in got and answer == expected:
                reward = 1.0
            elif got and answer and "<tool_call>" not in answer:
                reward = 0.5 * sum(a == b for a, b in zip(answer, expected)) / max(len(answer), len(expected))
            break
        success = float(record["verb"] in got and answer == expected)
        end = http.post(f"{url}/v1/sessions/{session['id']}/end",
                        json={"reward": reward, "scores": {"success": success, "tool_calls": calls}})
        end.raise_for_status()
    return {"session": session["id"], "group": group, "record": record, "reward": reward, "success": success,
            "answer": answer,
            "tool_calls": calls, "messages": messages, "stream": stream}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=os.environ.get("DYNAMO_RL_ROLLOUT_URL"),
                   help="the rollout endpoint, http://127.0.0.1:PORT (default: $DYNAMO_RL_ROLLOUT_URL)")
    p.add_argument("--episodes", type=int, default=16, help="episodes to play; 0: until stopped")
    p.add_argument("--group-size", type=int, default=int(os.environ.get("DYNAMO_RL_GROUP_SIZE", "4")),
                   help="episodes per task, one GRPO group (default: $DYNAMO_RL_GROUP_SIZE or 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--stream", choices=["never", "always", "alternate"], default="alternate")
    p.add_argument("--out", default=None, help="append one JSON line per episode")
    args = p.parse_args(argv)
    if not args.url:
        p.error("give --url (or set DYNAMO_RL_ROLLOUT_URL)")
    rng = random.Random(args.seed)

    def jobs():
        for g in itertools.count() if args.episodes == 0 else range(args.episodes // args.group_size):
            record = {"verb": rng.choice(["get", "rev"]), "key": rng.choice("abcdefgh"),
                      "value": "".join(rng.choice(string.digits) for _ in range(3))}
            for k in range(args.group_size):
                i = g * args.group_size + k
                stream = args.stream == "always" or (args.stream == "alternate" and i % 2 == 1)
                yield record, f"task-{args.seed}-{g}", args.seed * 100_000 + i, stream

    if args.episodes == 0:   # until stopped: SIGTERM ends the process, its sessions time out
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    results, running = [], set()
    with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
        for job in jobs():
            while len(running) >= args.concurrency:
                done, running = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for f in done:
                    r = f.result()
                    results.append(r)
                    print(f"episode {len(results)} ({r['group']}): reward {r['reward']:.2f}, {r['tool_calls']} tool "
                          f"call(s), answer {r['answer']!r}", flush=True)
            running.add(pool.submit(play, args.url, *job))
        results += [f.result() for f in running]
    if args.out:
        with open(args.out, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    ok = sum(r["success"] for r in results)
    print(f"{len(results)} episodes, success {ok / len(results):.2f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
