"""A bare gRPC sink for the weight-push benchmark's gRPC floor: one client-streaming method that
counts the bytes of raw frames and does nothing else (no parsing, hashing or copying), served
by grpc.aio with the rollout server's message limits.

    python benchmarks/grpc_sink.py PORT     # prints "ready" once it listens on 127.0.0.1:PORT
"""

from __future__ import annotations

import asyncio
import sys

import grpc

METHOD = "/sink.Sink/Consume"
SERVER_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 256 << 20)]


async def serve(port: int) -> None:
    async def consume(frames, context) -> bytes:
        n = 0
        async for frame in frames:
            n += len(frame)
        return n.to_bytes(8, "little")

    server = grpc.aio.server(options=SERVER_OPTIONS)
    handler = grpc.stream_unary_rpc_method_handler(consume, request_deserializer=None, response_serializer=None)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("sink.Sink", {"Consume": handler})])
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
