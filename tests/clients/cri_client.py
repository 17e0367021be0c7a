#!/usr/bin/env python3
"""A CRI ImageService client on grpcio, for pullgate's tests: one call per run, its answer as one
line of canonical JSON on stdout (keys sorted, proto field names, proto3 JSON mapping), or
{"code": "<gRPC code name>", "message": "..."} when the call fails. Exit 0 either way; 2 for a
usage error.

    cri_client.py --stubs DIR SOCKET imagefsinfo
    cri_client.py --stubs DIR SOCKET list
    cri_client.py --stubs DIR SOCKET pull IMAGE [--sandbox] [--auth USER:PASS]
    cri_client.py --stubs DIR SOCKET status IMAGE
    cri_client.py --stubs DIR SOCKET remove IMAGE
    cri_client.py --stubs DIR SOCKET raw /pkg.Service/Method HEX   (request bytes as given)

DIR holds the stubs grpc_tools.protoc generated from proto/cri/api.proto (cri/api_pb2.py and
cri/api_pb2_grpc.py). The channel is grpc.insecure_channel("unix:" + SOCKET), the way Python CRI
clients dial a unix socket; with --uri, "unix://" + SOCKET.
"""

import argparse
import json
import sys

MAX_MESSAGE = 16 * 1024 * 1024


def sandbox_config(pb):
    # What kubelet sends for a pod (the same pod as the Rust harness's pull_request()).
    uid = "6b1d3c3e-0000-4000-8000-000000000001"
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(
            name="harness-pod", uid=uid, namespace="default", attempt=0
        ),
        hostname="harness-pod",
        log_directory="/var/log/pods/default_harness-pod_" + uid,
    )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--stubs", required=True)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--uri", action="store_true", help='dial "unix://" + SOCKET')
    p.add_argument("socket")
    p.add_argument("command", choices=["imagefsinfo", "list", "pull", "status", "remove", "raw"])
    p.add_argument("args", nargs="*")
    p.add_argument("--sandbox", action="store_true")
    p.add_argument("--auth")
    a = p.parse_args()
    sys.path.insert(0, a.stubs)

    import grpc
    from google.protobuf import json_format
    from cri import api_pb2 as pb
    from cri import api_pb2_grpc as pb_grpc

    def need(n):
        if len(a.args) != n:
            p.error(f"{a.command} takes {n} argument(s)")

    channel = grpc.insecure_channel(
        ("unix://" if a.uri else "unix:") + a.socket,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ],
    )
    stub = pb_grpc.ImageServiceStub(channel)
    spec = lambda image: pb.ImageSpec(image=image)
    try:
        if a.command == "imagefsinfo":
            need(0)
            reply = stub.ImageFsInfo(pb.ImageFsInfoRequest(), timeout=a.timeout)
        elif a.command == "list":
            need(0)
            reply = stub.ListImages(pb.ListImagesRequest(), timeout=a.timeout)
        elif a.command == "pull":
            need(1)
            req = pb.PullImageRequest(image=spec(a.args[0]))
            if a.sandbox:
                req.sandbox_config.CopyFrom(sandbox_config(pb))
            if a.auth:
                user, _, password = a.auth.partition(":")
                req.auth.CopyFrom(pb.AuthConfig(username=user, password=password))
            reply = stub.PullImage(req, timeout=a.timeout)
        elif a.command == "status":
            need(1)
            reply = stub.ImageStatus(pb.ImageStatusRequest(image=spec(a.args[0])), timeout=a.timeout)
        elif a.command == "remove":
            need(1)
            reply = stub.RemoveImage(pb.RemoveImageRequest(image=spec(a.args[0])), timeout=a.timeout)
        else:
            need(2)
            call = channel.unary_unary(a.args[0])  # no serializers: bytes in, bytes out
            out = call(bytes.fromhex(a.args[1]), timeout=a.timeout)
            print(json.dumps({"reply_hex": out.hex()}, sort_keys=True))
            return 0
    except grpc.RpcError as e:
        print(json.dumps({"code": e.code().name, "message": e.details() or ""}, sort_keys=True))
        return 0
    print(json.dumps(json_format.MessageToDict(reply, preserving_proto_field_name=True), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
