"""Loopback-only ZMQ XSUB/XPUB forwarder for Dynamo's event plane ("broker mode").

Without a broker, Dynamo 1.6.1's ZMQ event publishers bind ``0.0.0.0``. With
``DYN_ZMQ_BROKER_URL="xsub=tcp://127.0.0.1:A , xpub=tcp://127.0.0.1:B"`` every
publisher connects to this forwarder instead, so nothing of the stack listens beyond
loopback (``shared/notes/dynamo.md``).

Run: ``python -m dynamo_rl.serving.broker --xsub-port A --xpub-port B`` (port 0 picks a
free port; the chosen ports are printed as one line ``broker xsub=HOST:A xpub=HOST:B``).
Must not import any other ``dynamo_rl`` module.
"""

from __future__ import annotations

import argparse
import sys


def broker_url(xsub_port: int, xpub_port: int, host: str = "127.0.0.1") -> str:
    """The value of ``DYN_ZMQ_BROKER_URL`` for a broker on ``host`` (format of Dynamo 1.6.1)."""
    return f"xsub=tcp://{host}:{xsub_port} , xpub=tcp://{host}:{xpub_port}"


def run(xsub_port: int = 0, xpub_port: int = 0, host: str = "127.0.0.1") -> None:
    """Bind XSUB and XPUB on ``host`` and forward until killed (SIGTERM/SIGINT). Blocks."""
    import zmq

    ctx = zmq.Context.instance()
    xsub = ctx.socket(zmq.XSUB)
    xpub = ctx.socket(zmq.XPUB)
    xsub.bind(f"tcp://{host}:{xsub_port}" if xsub_port else f"tcp://{host}:*")
    xpub.bind(f"tcp://{host}:{xpub_port}" if xpub_port else f"tcp://{host}:*")
    a = xsub.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1]
    b = xpub.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1]
    print(f"broker xsub={host}:{a} xpub={host}:{b}", flush=True)

    try:
        zmq.proxy(xsub, xpub)
    except (KeyboardInterrupt, SystemExit, zmq.ContextTerminated):
        pass
    finally:
        xsub.close(0)
        xpub.close(0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--xsub-port", type=int, default=0)
    p.add_argument("--xpub-port", type=int, default=0)
    p.add_argument("--host", default="127.0.0.1")
    a = p.parse_args(argv)
    run(a.xsub_port, a.xpub_port, a.host)


if __name__ == "__main__":
    main(sys.argv[1:])
