#!/usr/bin/env python3
"""A small capturing HTTP server on 127.0.0.1: records every request (method, path, headers, body as sent,
base64) as one JSON file per request in OUT_DIR, and answers 200 {"success": true} as Segment's API does.

    capture_server.py OUT_DIR PORT_FILE

Writes the port it listens on to PORT_FILE. Used by scripts/sdk/capture to make tests/fixtures/sdk/.
"""
import base64
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

OUT, PORT_FILE = sys.argv[1], sys.argv[2]
os.makedirs(OUT, exist_ok=True)
count = 0


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        global count
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n)
        count += 1
        record = {
            "method": "POST",
            "path": self.path,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body_base64": base64.b64encode(body).decode(),
        }
        with open(os.path.join(OUT, "%03d.json" % count), "w") as f:
            json.dump(record, f, indent=1)
        answer = b'{"success": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
with open(PORT_FILE, "w") as f:
    f.write(str(server.server_address[1]))
server.serve_forever()
