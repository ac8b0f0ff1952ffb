"""The tool API behind the ``api`` environment: a small stdlib HTTP server on 127.0.0.1.

    python -m tiltlm.envs.api_server --port 0      # prints {"host": "127.0.0.1", "port": N, "pid": P}

Endpoints (all GET, all answer JSON):

    /health                -> {"status": "ok", "pid": P}
    /calc?expr=17*23       -> {"expr": "17*23", "result": 391}
    /lookup?key=capital of France -> {"key": "capital of france", "value": "Paris"}
    /keys                  -> {"keys": [...]}      (every key /lookup knows)

A malformed call (bad expression, unknown key, unknown endpoint, missing parameter, other method)
answers HTTP 4xx with ``{"error": "<what was wrong>"}``; the environment shows that to the policy.

``/calc`` never calls ``eval``: it walks the ``ast`` of the expression and allows only numbers,
``+ - * / // % **``, unary ``+ -`` and parentheses; ``^`` ``×`` ``÷`` are read as ``** * /``.
Exponents are bounded (|e| <= 64) and every intermediate result too (|x| <= 1e100), so no input
can make the server compute for long or allocate much.

The server binds 127.0.0.1 only (never a public interface) and exits on its own when its parent
process dies — its stdin reaches EOF or its parent pid changes — so no server outlives the run,
even when the parent is SIGKILLed. It imports only the standard library: the environment starts
it as a script (``python -I api_server.py``), without importing tiltlm (and torch) a second time.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import math
import operator
import os
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

HOST = "127.0.0.1"
MAX_EXPR_CHARS = 200
MAX_EXPONENT = 64
MAX_MAGNITUDE = 10**100

FACTS: dict[str, str] = {
    "capital of france": "Paris", "capital of germany": "Berlin", "capital of italy": "Rome",
    "capital of spain": "Madrid", "capital of japan": "Tokyo", "capital of egypt": "Cairo",
    "capital of canada": "Ottawa", "capital of australia": "Canberra", "capital of kenya": "Nairobi",
    "capital of peru": "Lima", "days in a week": "7", "days in a leap year": "366",
    "legs of a spider": "8", "legs of an insect": "6", "minutes in an hour": "60",
    "boiling point of water in celsius": "100", "planets in the solar system": "8",
    "largest planet": "Jupiter", "chemical symbol of gold": "Au", "author of hamlet": "Shakespeare",
}


class ApiError(Exception):
    """A malformed call: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ---- /calc: a safe arithmetic evaluator ------------------------------------------------------
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def calc(expr: str) -> int | float:
    """The value of an arithmetic expression; ApiError (with the reason) for anything else."""
    text = expr.strip().replace("^", "**").replace("×", "*").replace("÷", "/").rstrip("=?").strip()
    if not text:
        raise ApiError("empty expression; write numbers and + - * / // % ** ( ), e.g. 17*23")
    if len(text) > MAX_EXPR_CHARS:
        raise ApiError(f"expression of {len(text)} chars is too long (at most {MAX_EXPR_CHARS})")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ApiError(f"cannot parse {text!r}; write numbers and + - * / // % ** ( ), e.g. 17*23") from None
    value = _eval(tree.body)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        value = int(value)
    return value


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _bounded(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ApiError(f"exponent {right:g} too large (at most {MAX_EXPONENT})")
        try:
            value = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ApiError("division by zero") from None
        except OverflowError:
            raise ApiError("result too large") from None
        if isinstance(value, complex):
            raise ApiError("result is not a real number")
        return _bounded(value)
    what = type(node).__name__.lower()
    raise ApiError(f"'{what}' is not allowed; only numbers and + - * / // % ** ( ) are")


def _bounded(value: float) -> float:
    if (isinstance(value, float) and not math.isfinite(value)) or abs(value) > MAX_MAGNITUDE:
        raise ApiError("result too large (at most 1e100 in magnitude)")
    return value


# ---- /lookup --------------------------------------------------------------------------------
def normalize_key(key: str) -> str:
    """'What is the Capital of France?' -> 'capital of france'."""
    key = re.sub(r"[?.!,'\"]", " ", key.lower())
    key = re.sub(r"^\s*(what|who)\s+(is|are|was)\s+", "", key)
    key = re.sub(r"^\s*(the|number of|how many)\s+", "", key)
    return " ".join(key.split())


def lookup(key: str) -> str:
    norm = normalize_key(key)
    if norm in FACTS:
        return FACTS[norm]
    close = difflib.get_close_matches(norm, FACTS, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ApiError(f"unknown key '{norm}'; {hint}GET /keys lists the known keys", status=404)


# ---- HTTP -----------------------------------------------------------------------------------
def _param(query: dict[str, list[str]], name: str, endpoint: str, example: str) -> str:
    if name not in query:
        raise ApiError(f"missing parameter '{name}'; call {endpoint}?{name}={example}")
    return query[name][0]


def answer(path: str) -> dict:
    """The JSON result of a GET of ``path`` (with its query string); ApiError if malformed."""
    parts = urlsplit(path)
    query = parse_qs(parts.query, keep_blank_values=True)
    endpoint = parts.path.rstrip("/") or "/"
    if endpoint == "/health":
        return {"status": "ok", "pid": os.getpid()}
    if endpoint == "/calc":
        expr = _param(query, "expr", "/calc", "17*23")
        return {"expr": expr, "result": calc(expr)}
    if endpoint == "/lookup":
        key = _param(query, "key", "/lookup", "capital+of+France")
        return {"key": normalize_key(key), "value": lookup(key)}
    if endpoint == "/keys":
        return {"keys": sorted(FACTS)}
    raise ApiError(f"unknown endpoint '{endpoint}'; endpoints: /calc?expr=, /lookup?key=, /keys, /health", status=404)


class Handler(BaseHTTPRequestHandler):
    server_version = "tiltlm-api/1"
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:  # http.server's naming
        try:
            status, body = 200, answer(self.path)
        except ApiError as e:
            status, body = e.status, {"error": str(e)}
        except Exception as e:  # noqa: BLE001 - a bug answers 500, the server keeps serving
            status, body = 500, {"error": f"internal error: {type(e).__name__}"}
        self._send(status, body)

    def _not_allowed(self) -> None:
        self._send(405, {"error": f"method {self.command} not allowed; use GET"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _not_allowed

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, *args) -> None:  # quiet: nobody reads the server's stderr per request
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # a dropped client is not news
        pass


def _exit_with_parent(parent_pid: int, watch_stdin: bool) -> None:
    """Exit the process when the parent dies: stdin EOF (the parent's pipe end closed) or reparenting."""
    if watch_stdin:
        def on_eof() -> None:
            try:
                while sys.stdin.buffer.read(4096):
                    pass
            except (OSError, ValueError):
                pass
            os._exit(0)

        threading.Thread(target=on_eof, daemon=True, name="stdin-watchdog").start()

    def on_orphan() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.2)
        os._exit(0)

    threading.Thread(target=on_orphan, daemon=True, name="parent-watchdog").start()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0 = any free port)")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process is no longer our parent")
    parser.add_argument("--watch-stdin", action="store_true", help="exit when stdin reaches EOF (the parent closed it)")
    args = parser.parse_args(argv)
    parent = args.parent_pid if args.parent_pid is not None else os.getppid()
    _exit_with_parent(parent, args.watch_stdin)
    server = Server((HOST, args.port), Handler)
    host, port = server.server_address[:2]
    print(json.dumps({"host": host, "port": port, "pid": os.getpid()}), flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
