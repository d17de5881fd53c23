"""Container health check: exit 0 when the service's /health answers 200.

Runs inside the llm-local images (Docker HEALTHCHECK and the compose healthcheck) with
only the standard library, so the images need no curl. /health answers 503 while the
model loads or after it failed; urlopen raises on any non-2xx status.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def main() -> int:
    port = os.environ.get("LLM_LOCAL_SERVICE_HTTP_PORT", "16060")
    url = f"http://127.0.0.1:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except OSError as error:  # URLError and HTTPError are OSErrors
        print(f"unhealthy: {url}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
