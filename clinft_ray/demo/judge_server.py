"""A rule-based judge behind a real OpenAI-compatible HTTP endpoint, for the demo and the tests.

No LLM can run on a machine without a GPU and a model hub, so the demo's judge grades by word overlap
between the `### Candidate` and `### Reference` sections of the prompt clinft-ray sends: unigram F1
>= 0.6 is CORRECT, and a Likert rating is 1 + round(4 x F1). It speaks the same
`POST /v1/chat/completions` protocol as vLLM or a hosted API, so clinft-ray's judge client, cache,
retries and concurrency are exercised for real. Point `judge.base_url` at a real LLM for a real study.

    python -m clinft_ray.demo.judge_server --port 8008     # then judge.base_url: http://127.0.0.1:8008/v1
"""

from __future__ import annotations

import argparse
import json
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _section(text: str, name: str) -> str:
    m = re.search(rf"### {name}\n(.*?)(?=\n\n### |\Z)", text, flags=re.S)
    return m.group(1) if m else ""


def overlap_f1(candidate: str, reference: str) -> float:
    """Unigram F1 between two texts (lower-cased words)."""
    c, r = Counter(re.findall(r"\w+", candidate.lower())), Counter(re.findall(r"\w+", reference.lower()))
    common = sum((c & r).values())
    if not common:
        return 0.0
    precision, recall = common / sum(c.values()), common / sum(r.values())
    return 2 * precision * recall / (precision + recall)


def grade(system: str, user: str) -> str:
    f1 = overlap_f1(_section(user, "Candidate"), _section(user, "Reference"))
    if "CORRECT or INCORRECT" in system:
        return "CORRECT" if f1 >= 0.6 else "INCORRECT"
    return str(1 + round(4 * f1))


class _Handler(BaseHTTPRequestHandler):
    requests_served = 0

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self.send_error(404)
            return
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        msgs = body.get("messages", [])
        system = next((m["content"] for m in msgs if m.get("role") == "system"), "")
        user = next((m["content"] for m in msgs if m.get("role") == "user"), "")
        type(self).requests_served += 1
        reply = {
            "id": f"demo-{type(self).requests_served}",
            "object": "chat.completion",
            "created": 0,
            "model": body.get("model", "demo-judge"),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": grade(system, user)}}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 1, "total_tokens": 1},
        }
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:  # requests carry patient text: log nothing
        pass


def start(port: int = 0) -> tuple[ThreadingHTTPServer, str]:
    """Serve on 127.0.0.1 (port 0: any free port) in a daemon thread; returns (server, base_url)."""
    server = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="rule-based OpenAI-compatible judge for the demo")
    parser.add_argument("--port", type=int, default=8008)
    args = parser.parse_args(argv)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), _Handler)
    print(f"demo judge on http://127.0.0.1:{args.port}/v1", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
