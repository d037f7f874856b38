"""A local S3 API server (moto's, in this process) with an injected per-request latency.

`bigasp bench load --local-s3` measures loading from object storage without a cloud account:
the server speaks the real S3 HTTP API on 127.0.0.1, and `latency_ms` delays every request the
way a far-away bucket would, so one can see how deep the prefetch must be to hide it. moto is a
development dependency (`pip install 'moto[server]'`), not needed for training.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from bigasp.errors import ConfigError


class Faults:
    """Transient failures to inject: the next `slow_down` requests are answered 503 SlowDown, as
    a throttled bucket does, so retry-with-backoff is exercised against the real protocol."""

    def __init__(self, slow_down: int = 0):
        self.slow_down = slow_down
        self.injected = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.slow_down <= 0:
                return False
            self.slow_down -= 1
            self.injected += 1
            return True


_SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


@contextmanager
def local_s3(latency_ms: float = 0.0, faults: Faults | None = None) -> Iterator[str]:
    """Run the server while the block runs; yields its endpoint URL (http://127.0.0.1:PORT)."""
    try:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server
    except ImportError:
        raise ConfigError(
            "--local-s3 needs moto's server: pip install 'moto[server]' (a development dependency)"
        ) from None
    app = DomainDispatcherApplication(create_backend_app)
    delay = latency_ms / 1000.0

    def delayed(environ, start_response):
        if delay > 0:
            time.sleep(delay)
        if faults is not None and faults.take():
            body = b"" if environ.get("REQUEST_METHOD") == "HEAD" else _SLOW_DOWN
            start_response(
                "503 Slow Down", [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))]
            )
            return [body]
        return app(environ, start_response)

    server = make_server("127.0.0.1", 0, delayed, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="bigasp-local-s3")
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join()
