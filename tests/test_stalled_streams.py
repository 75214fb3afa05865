"""A client that grants no HTTP/2 flow-control window while its connection stays healthy (a slow-read attack, or a
proxy whose own client stalls) leaves its streams' messages unsent: each such stream is ended once a message has
waited --stream-stall-timeout, and its --max-concurrent-rpcs slot is free again (one connection held them all, for as long
as it lived)."""
import socket
import struct
import threading

import h2.config
import h2.connection
import h2.settings

from clients.client import Client
from protos.loraplex.v1 import inference_pb2 as pb
from tests.helpers import scrape, start_server, wait_for

HANDLED = ('grpc_server_handled_total{grpc_code="RESOURCE_EXHAUSTED",grpc_method="GenerateStream",'
           'grpc_service="loraplex.v1.Inference",grpc_type="server_stream"}')


class StallingConnection:
    """One raw HTTP/2 connection that opens GenerateStream calls with a 64-byte stream window it never grows. It
    reads everything the server sends and answers its pings and settings, as a healthy peer does."""

    def __init__(self, port: int, streams: int, max_new_tokens: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.settimeout(0.2)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.h2.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 64})
        self.h2.initiate_connection()
        body = pb.GenerateRequest(prompt="hello", stopping=pb.StoppingCriteria(
            max_new_tokens=max_new_tokens, ignore_eos=True)).SerializeToString()
        for _ in range(streams):
            stream = self.h2.get_next_available_stream_id()
            self.h2.send_headers(stream, [(":method", "POST"), (":scheme", "http"),
                                          (":path", "/loraplex.v1.Inference/GenerateStream"),
                                          (":authority", f"127.0.0.1:{port}"), ("content-type", "application/grpc"),
                                          ("te", "trailers")])
            self.h2.send_data(stream, b"\0" + struct.pack(">I", len(body)) + body, end_stream=True)
        self.sock.sendall(self.h2.data_to_send())
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        while not self.stop.is_set():
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                return
            self.h2.receive_data(data)  # DATA is never acknowledged: no WINDOW_UPDATE
            self.sock.sendall(self.h2.data_to_send())

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()


def test_streams_whose_client_takes_no_messages_are_ended_and_free_their_slots(model_dirs):
    server = start_server(model_dirs["llama"], None, max_concurrent_rpcs=4, stream_stall_timeout=1.0)
    stalling = StallingConnection(server.ports.grpc, 4, 300)
    try:
        with Client(server.target, timeout=30) as client:
            assert wait_for(lambda: scrape(server).get(HANDLED) == 4, timeout=20)  # ended, not held
            # their rows leave at the engine's next step after the calls end (a full run read the gauge before it)
            assert wait_for(lambda: scrape(server)['loraplex_num_requests_running'] == 0, timeout=10)
            assert len(client.generate("hello", max_new_tokens=3, ignore_eos=True).token_ids) == 3  # a slot is free
        # such a call stays open in grpc's core until its connection closes: one connection holds a bounded number
        assert stalling.h2.remote_settings.max_concurrent_streams == 3000  # 4 x the limit, at least 3000
    finally:
        stalling.close()
        server.stop()
