"""An OpenAI-compatible completions server for GPT-J, with continuous batching; `sample.py --serve` starts it.

    POST /v1/completions   OpenAI's completions API as vLLM serves it: prompts as strings or token ids, echo,
                           logprobs, penalties, logit_bias, stop, n, seed, stream
    GET  /v1/models        the one model served, with its context length (max_model_len)
    GET  /tokenizer_info, POST /tokenize, POST /detokenize   vLLM's tokenizer endpoints (lm-evaluation-harness)
    GET  /health           {"status": "ok"}, or 503 {"status": "compiling"} while the programs are compiled
    GET  /                 a playground page (assets/playground.html): prompt, settings, the completion streamed in,
                           each token coloured by its probability, the alternatives on hover

Three layers: serve_protocol.py (the API: requests checked and turned into choices, their answers), serve_engine.py
(the batching engine: one model thread owns the device and decodes every request's rows in one batch), and this
file (HTTP: handler threads parse requests, hand them to the model thread and write out what it sends back).
"""
import ipaddress
import json
import os
import queue
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import data
import decode
import serve_protocol as api
from serve_engine import Engine

PAGE = Path(__file__).resolve().parent / "assets" / "playground.html"  # GET /: the playground
MAX_BODY = 64 << 20  # bytes of a request body


class Server(ThreadingHTTPServer):
    """Handler threads queue jobs; one model thread (`Engine`) runs them all."""
    daemon_threads = False  # so that server_close() waits for the requests in flight
    request_queue_size = 1024  # connections waiting to be accepted: the default 5 resets a crowd's

    def __init__(self, address, params, cfg, *, mesh=None, enc=None, slots=16, model_name="gpt-j", allow_origin=(),
                 chunk=decode.CHUNK, compile_all=False, log=sys.stderr):
        super().__init__(address, _Handler)
        self.cfg, self.enc, self.model_name = cfg, enc or data.tokenizer(), model_name
        self.allow_origin = set(allow_origin)  # other sites' pages that may call the API from a browser
        self.loopback = ipaddress.ip_address(socket.gethostbyname(address[0])).is_loopback
        self.engine = Engine(params, cfg, mesh, slots, chunk)
        self.compile_all, self.log, self.compile_s = compile_all, log, None
        self.ready = threading.Event()  # set once the programs are compiled (at once without compile_all)
        self.jobs = queue.Queue()
        self.created = int(time.time())
        self.worker = threading.Thread(target=self._work, name="model", daemon=True)
        self.loop = threading.Thread(target=self.serve_forever, name="http", daemon=True)

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up is no server error
            super().handle_error(request, client_address)

    def close(self):
        """Stop accepting, finish the requests in flight, then stop the model thread."""
        self.shutdown()
        self.server_close()
        self.jobs.put(None)
        self.worker.join()

    def _work(self):
        engine, stopping = self.engine, False
        try:
            if self.compile_all:  # before any request: requests that come meanwhile wait in the queue
                self.compile_s = engine.compile_all(self.log)
        except Exception as e:  # serve anyway, compiling shapes as traffic meets them
            print(f"compiling every shape failed ({type(e).__name__}: {e}); each is compiled when first met",
                  file=self.log, flush=True)
        finally:
            self.ready.set()
        while not stopping or engine.busy() or not self.jobs.empty():
            jobs = []
            try:
                while True:  # wait for work only when there is nothing to do
                    job = self.jobs.get(block=not engine.busy() and not jobs and not stopping)
                    if job is None:
                        stopping = True
                    else:
                        jobs.append(job)
            except queue.Empty:
                pass
            try:
                if jobs:
                    engine.accept(jobs)
                engine.iterate()
            except Exception as e:  # tell the clients, keep serving
                for job in jobs:
                    for c in job.choices:
                        c.done = True
                    job.events.put(("error", f"generation failed: {type(e).__name__}: {e}"))
                engine.fail(f"generation failed: {type(e).__name__}: {e}")

class _Handler(BaseHTTPRequestHandler):
    timeout = 60  # seconds a client may stall mid-request, so that a dead one cannot hold up shutdown

    def do_GET(self):
        if not self._host_ok():
            return
        if self.path in ("/", "/index.html"):
            return self._send_page()
        if self.path == "/health":
            ready = self.server.ready.is_set()
            return self._send(200 if ready else 503, {"status": "ok" if ready else "compiling"})
        if self.path == "/v1/models":
            return self._send(200, api.models(self.server.model_name, self.server.created, self.server.cfg))
        if self.path == "/tokenizer_info":
            return self._send(200, api.tokenizer_info(self.server.cfg))
        self._send(404, {"error": f"no such endpoint: GET {self.path}"})

    def do_OPTIONS(self):
        """A browser's CORS preflight: answered only for an origin that --allow_origin names."""
        if not self._host_ok():
            return
        origin = self.headers.get("Origin")
        if origin not in self.server.allow_origin:
            return self._send(403, {"error": f"cross-origin requests from {origin} are not allowed: start the server "
                                             f"with --allow_origin {origin} to allow them"})
        self.send_response(204)
        self._cors()
        self.send_header("Access-Control-Allow-Methods", "GET, POST")
        self.send_header("Access-Control-Allow-Headers", "Content-Type, Authorization")
        self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _cors(self):
        origin = self.headers.get("Origin")
        if origin in self.server.allow_origin:
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")

    def _send_page(self):
        body = PAGE.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        # The page may talk to this server only, and nothing may frame it.
        self.send_header("Content-Security-Policy", "default-src 'none'; script-src 'unsafe-inline'; style-src "
                         "'unsafe-inline'; connect-src 'self'; img-src 'self'; frame-ancestors 'none'; base-uri 'none'")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _host_ok(self):
        """DNS rebinding: a page elsewhere can give its own name the address 127.0.0.1 and so call a server on
        loopback as its own origin. A server bound to loopback answers only requests made to a loopback name."""
        host = _hostname(self.headers.get("Host") or "").lower()
        if not self.server.loopback or host in ("localhost", "[::1]") or host.startswith("127."):
            return True
        self._send(403, {"error": f"Host {host!r} is not a loopback name: open the server as "
                                  f"http://127.0.0.1:{self.server.server_address[1]}/, or start it with --host"})
        return False

    def do_POST(self):
        if not self._host_ok():
            return
        routes = {"/v1/completions": self._completions, "/tokenize": self._tokenize, "/detokenize": self._detokenize}
        if self.path not in routes:
            return self._send(404, {"error": f"no such endpoint: POST {self.path}"})
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length < 0:
                raise ValueError(f"Content-Length {length} is negative")
            if length > MAX_BODY:
                self.close_connection = True  # the body is not read
                return self._send(413, {"error": f"a body of {length} bytes is over the limit of {MAX_BODY}"})
            body = self.rfile.read(length)
            if self.headers.get_content_type() != "application/json":
                return self._send(415, {"error": f"send the body as Content-Type: application/json, not "
                                                 f"{self.headers.get_content_type()}"})
            return routes[self.path](body)
        except ValueError as e:
            return self._send(400, {"error": str(e)})

    def _tokenize(self, body):
        self._send(200, api.tokenize(body, self.server.enc, self.server.cfg))

    def _detokenize(self, body):
        self._send(200, api.detokenize(body, self.server.enc, self.server.cfg))

    def _completions(self, body):
        job = api.parse(body, self.server.cfg, self.server.enc)
        self.server.jobs.put(job)
        head = {"id": f"cmpl-{os.urandom(12).hex()}", "object": "text_completion", "created": int(time.time()),
                "model": self.server.model_name}
        if job.stream:
            return self._stream(job, head)
        kind, *rest = job.events.get()
        if kind == "error":
            return self._send(500, {"error": rest[0]})
        self._send(200, {**head, "choices": [c.result() for c in job.choices], "usage": job.usage()})

    def _stream(self, job, head):
        self.send_response(200)
        self._cors()
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        try:
            while True:
                kind, *rest = job.events.get()
                # Everything already waiting goes out in one write: a client that fell behind catches up.
                events = [(kind, *rest)] + list(iter(lambda: _next(job.events), None))
                out, end = [], False
                for kind, *rest in events:
                    if kind == "chunk":
                        out.append({**head, "choices": [rest[0]]})
                        continue
                    if kind == "error":
                        out.append({"error": rest[0]})
                    elif job.usage_chunk:
                        out.append({**head, "choices": [], "usage": job.usage()})
                    end = True
                    break
                self.wfile.write("".join(f"data: {json.dumps(x)}\n\n" for x in out).encode() +
                                 (b"data: [DONE]\n\n" if end else b""))
                self.wfile.flush()
                if end:
                    break
        except OSError:  # the client went away: stop generating for it
            job.cancelled = True

    def _send(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self._cors()
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _hostname(header):
    """The name in a Host header, without its port."""
    return header[:header.find("]") + 1] if header.startswith("[") else header.rsplit(":", 1)[0]


def _next(events):
    try:
        return events.get_nowait()
    except queue.Empty:
        return None


def serve(params, cfg, host="127.0.0.1", port=8000, **kw) -> Server:
    """Start the server in background threads; `.close()` stops it cleanly."""
    server = Server((host, port), params, cfg, **kw)
    server.worker.start()
    server.loop.start()
    return server
