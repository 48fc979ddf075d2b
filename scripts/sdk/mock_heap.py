#!/usr/bin/env python3
"""A mock Heap on 127.0.0.1 for scripts/sdk-check: answers 200 to every POST and records its JSON body;
GET /_calls returns them all as [{"path": ..., "body": ...}].

    mock_heap.py PORT_FILE
"""
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

calls = []
lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self, code, payload):
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n)
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        with lock:
            calls.append({"path": self.path, "body": parsed})
        self._answer(200, {})

    def do_GET(self):
        with lock:
            self._answer(200, list(calls))

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
with open(sys.argv[1], "w") as f:
    f.write(str(server.server_address[1]))
server.serve_forever()
