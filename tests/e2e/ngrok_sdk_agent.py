"""
A program of the e2e tests: the real ngrok Python SDK as an agent.

    python ngrok_sdk_agent.py SERVER_ADDR CA_FILE AUTHTOKEN FORWARD_TO [--count N] [--http NAME]

Connects to SERVER_ADDR with the CA in CA_FILE and AUTHTOKEN, opens N TCP
endpoints (HTTP endpoints for the domain NAME with ``--http``) forwarding
to FORWARD_TO (``host:port``) and prints ``URL <url>``
for each, then ``READY``, and runs until killed.  A failure to connect or
bind prints ``ERROR <text>`` and exits 3.
"""

from __future__ import annotations

import asyncio
import os
import sys


async def main(argv: list[str]) -> int:
    import ngrok

    if os.environ.get("NGROK_SDK_LOG"):
        import logging

        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
        ngrok.log_level(os.environ["NGROK_SDK_LOG"])
    server_addr, ca_file, authtoken, forward_to = argv[:4]
    count = int(argv[argv.index("--count") + 1]) if "--count" in argv else 1
    with open(ca_file, "rb") as f:
        ca = bytearray(f.read())
    try:
        session = (
            await ngrok.SessionBuilder()
            .server_addr(server_addr)
            .ca_cert(ca)
            .authtoken(authtoken)
            .connect()
        )
        listeners = []
        http = argv[argv.index("--http") + 1] if "--http" in argv else None
        for _ in range(count):
            if http is not None:
                builder = session.http_endpoint().domain(http)
                listener = await builder.listen_and_forward(f"http://{forward_to}")
            else:
                listener = await session.tcp_endpoint().listen_and_forward(f"tcp://{forward_to}")
            listeners.append(listener)
            print("URL", listener.url(), flush=True)
    except Exception as e:  # noqa: BLE001 - what the SDK raises is the point
        print("ERROR", str(e).replace("\n", " | "), flush=True)
        return 3
    print("READY", flush=True)
    while True:
        await asyncio.sleep(3600)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
