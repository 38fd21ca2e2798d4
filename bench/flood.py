"""A flood of callers sending wrong app secrets, and what they were answered.

Each caller, on a connection of its own, calls GetTaskNodeDetail again and again with
a fresh random secret for one app, so every call brings a credential the server has
never seen: without bounds each costs it a slow hash. The flood runs for a number of
seconds, or until its standard input closes (how a test stops it), then prints one JSON
object: how many answers of each ErrorInfo reason (or bare status code) it got.

    .venv/bin/python -m bench.flood 127.0.0.1:50151 esb_test --callers 16 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import threading
from collections import Counter

import grpc
from bksops.tasknode.v1 import task_node_pb2 as pb
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc
from google.rpc import error_details_pb2
from google.rpc import status_pb2

METADATA_KEY = "x-bkapi-authorization"
DETAILS_KEY = "grpc-status-details-bin"
#: Any request will do: credentials are checked before it is read.
REQUEST = pb.GetTaskNodeDetailRequest(
    bk_biz_id="2", task_id="10", node_id="node0df0431f8f553925af01a94854bd"
)


def reason_of(error: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason of a failed call, or its bare status code's name."""
    for key, value in error.trailing_metadata() or ():
        if key == DETAILS_KEY and isinstance(value, bytes):
            info = error_details_pb2.ErrorInfo()
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Unpack(info):
                    return info.reason
    return error.code().name


async def flood(addr: str, app_code: str, callers: int, stop: threading.Event) -> Counter[str]:
    """Run callers until stop is set: the answers they got, by reason."""
    answered: Counter[str] = Counter()

    async def caller() -> None:
        # A connection of its own (gRPC shares one between alike channels otherwise), so
        # the callers spread over the server's processes as separate clients would.
        options = [("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.insecure_channel(addr, options=options) as channel:
            stub = pb_grpc.TaskNodeServiceStub(channel)
            while not stop.is_set():
                guess = {"bk_app_code": app_code, "bk_app_secret": secrets.token_urlsafe(32)}
                header = json.dumps({**guess, "bk_username": "flood"})
                try:
                    await stub.GetTaskNodeDetail(
                        REQUEST, metadata=((METADATA_KEY, header),), timeout=10
                    )
                    answered["OK"] += 1
                except grpc.aio.AioRpcError as error:
                    answered[reason_of(error)] += 1

    await asyncio.gather(*(caller() for _ in range(callers)))
    return answered


def run(
    addr: str, app_code: str, callers: int, seconds: float, stdin: bool = False
) -> Counter[str]:
    """flood for seconds, or with stdin until standard input closes if that comes first."""
    stop = threading.Event()
    timer = threading.Timer(seconds, stop.set)
    timer.start()
    if stdin:
        threading.Thread(target=_set_when_stdin_closes, args=(stop,), daemon=True).start()
    try:
        return asyncio.run(flood(addr, app_code, callers, stop))
    finally:
        timer.cancel()


def _set_when_stdin_closes(stop: threading.Event) -> None:
    sys.stdin.read()
    stop.set()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("addr")
    parser.add_argument("app_code")
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--until-stdin-closes", action="store_true")
    args = parser.parse_args()
    answered = run(args.addr, args.app_code, args.callers, args.seconds, args.until_stdin_closes)
    print(json.dumps(answered), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
