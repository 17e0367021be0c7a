#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz targets into corpus/<target>/ (run once; the corpora are
committed, minimised). Real shapes: kubelet's and kruise-daemon's PullImage requests, Docker Hub
and GHCR manifests and indexes, registries' WWW-Authenticate headers and token answers,
containerd hosts.toml files, the repository's config/pullgate.toml, and the HTTP/2 streams
real gRPC clients wrote on a unix socket (seeds/h2/)."""
import base64, hashlib, json, os, sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", "..", ".."))
CORPUS = os.path.join(HERE, "..", "corpus")


def put(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


# --- protobuf, by hand (only what PullImageRequest uses) ---
def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(num, payload):
    if isinstance(payload, str):
        payload = payload.encode()
    return varint(num << 3 | 2) + varint(len(payload)) + payload


def mapping(num, d):
    return b"".join(field(num, field(1, k) + field(2, v)) for k, v in d.items())


def pull(image, auth=None, sandbox=None, handler=""):
    spec = field(1, image) + (field(19, handler) if handler else b"")
    msg = field(1, spec)
    if auth:
        msg += field(2, b"".join(field(n, auth[k]) for n, k in enumerate(
            ["username", "password", "auth", "server_address", "identity_token", "registry_token"], 1)
            if k in auth))
    if sandbox is not None:
        meta = field(1, field(1, sandbox.get("name", "web-0")) + field(2, "uid-1") + field(3, "default")
                     + varint(4 << 3) + varint(0))
        msg += field(3, meta + field(2, "web-0") + mapping(7, sandbox.get("annotations", {})))
    return msg


def pull_requests():
    put("pull_request", "kubelet", pull("nginx:1.27", sandbox={}))
    put("pull_request", "kubelet-auth", pull("registry.example.com:5000/team/app@sha256:" + "a" * 64,
        auth={"username": "u", "password": "p", "server_address": "registry.example.com:5000"}, sandbox={}))
    put("pull_request", "kruise", pull("ghcr.io/org/tool:v2", sandbox={"annotations": {
        "apps.kruise.io/pulling-image-by": "imagepulljob", "pullgate.io/priority": "-3"}}))
    put("pull_request", "crictl", pull("docker.io/library/busybox"))
    put("pull_request", "auth-b64", pull("quay.io/x/y:z", auth={"auth": base64.b64encode(b"user:pa:ss").decode()}))
    put("pull_request", "identity", pull("localhost:5000/x", auth={"identity_token": "t", "registry_token": "r"},
        handler="runc"))
    put("pull_request", "priority-huge", pull("a/b", sandbox={"annotations": {"pullgate.io/priority": "99999999999"}}))


def references():
    for i, r in enumerate([
        "busybox", "library/busybox:latest", "docker.io/library/busybox:1.36",
        "index.docker.io/library/nginx", "localhost:5000/a/b/c:tag",
        "[::1]:5000/x@sha256:" + "0" * 64, "ghcr.io/org/img:v1@sha256:" + "f" * 64,
        "registry.k8s.io/pause:3.9", "Upper/Case", "a" * 300, "x:" + "t" * 129,
        "host/repo@sha512:" + "1" * 128, "quay.io/a/b:c@sha256:short", " busybox ",
    ]):
        put("image_reference", str(i), r)


def config():
    with open(os.path.join(ROOT, "config", "pullgate.toml"), "rb") as f:
        put("config", "shipped", f.read())
    put("config", "schedule", '''[schedule]
bandwidth = "100MB"
prewarm_bandwidth = "30%"
prewarm_floor = "1MB"
max_prewarm_jobs = 2
large_image_size = "1GiB"

[p2p_gate]
probe = "tcp"
target = "127.0.0.1:5001"
interval = "2s"
timeout = "1s"

[[prewarm]]
image = "nginx:1.27"
priority = 10
policy = "keep"
interval = "24h"
timeout = "10m"
deadline = "1h"
docker_config = "/root/.docker/config.json"
''')
    put("config", "huge", '''[schedule]
bandwidth = 18446744073709551615
prewarm_bandwidth = "100%"

[fetch]
lease_expiry = "584542046090y"
''')


def digest(c):
    return "sha256:" + hashlib.sha256(c.encode()).hexdigest()


def manifests():
    layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest("l"), "size": 3}
    oci = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest("c"), "size": 2},
           "layers": [layer, dict(layer, mediaType="application/vnd.oci.image.layer.v1.tar+zstd")],
           "annotations": {"org.opencontainers.image.created": "2024-01-01T00:00:00Z"}}
    docker = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
              "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 1470,
                         "digest": digest("dc")},
              "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": 2220,
                          "digest": digest("dl")}]}
    plats = [("linux", "amd64", None), ("linux", "arm", "v6"), ("linux", "arm", "v7"), ("linux", "arm64", "v8"),
             ("linux", "386", None), ("linux", "ppc64le", None), ("unknown", "unknown", None),
             ("windows", "amd64", None)]
    entries = []
    for os_, arch, var in plats:
        p = {"architecture": arch, "os": os_}
        if var:
            p["variant"] = var
        e = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest(arch + (var or "")),
             "size": 1000, "platform": p}
        if os_ == "unknown":
            e["annotations"] = {"vnd.docker.reference.type": "attestation-manifest"}
        if os_ == "windows":
            p["os.version"] = "10.0.17763.5830"
        entries.append(e)
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries}
    dlist = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json",
             "manifests": [dict(e, mediaType="application/vnd.docker.distribution.manifest.v2+json")
                           for e in entries[:5]]}
    schema1 = {"schemaVersion": 1, "name": "library/x", "tag": "1", "fsLayers": [{"blobSum": digest("x")}]}
    # First byte: which Content-Type the registry sent (see pullgate::fuzzing::manifest).
    put("manifest", "oci", b"\x00" + json.dumps(oci).encode())
    put("manifest", "docker", b"\x04" + json.dumps(docker).encode())
    put("manifest", "index", b"\x01" + json.dumps(index).encode())
    put("manifest", "list", b"\x03" + json.dumps(dlist).encode())
    put("manifest", "schema1", b"\x05" + json.dumps(schema1).encode())
    bare = dict(index)
    del bare["mediaType"]
    put("manifest", "index-untyped", b"\x00" + json.dumps(bare).encode())
    put("manifest", "foreign", b"\x02" + json.dumps(dict(oci, layers=[dict(layer, urls=["https://x/y"],
        mediaType="application/vnd.docker.image.rootfs.foreign.diff.tar.gzip")])).encode())


def hosts():
    put("hosts_toml", "mirrors", '''docker.io
server = "https://registry-1.docker.io"

[host."http://127.0.0.1:5050"]
  capabilities = ["pull", "resolve"]
  skip_verify = true

[host."https://mirror.example.com/v2/proxy"]
  capabilities = ["pull"]
  override_path = true
  ca = ["/etc/certs/mirror.pem", "ca2.pem"]
  client = [["/etc/certs/client.cert", "/etc/certs/client.key"]]
  [host."https://mirror.example.com/v2/proxy".header]
    x-custom-2 = ["value1", "value2"]
    authorization = "Bearer secret"
''')
    put("hosts_toml", "localhost", '''localhost:5000
[host."http://localhost:5000"]
  capabilities = ["pull", "resolve", "push"]
''')
    put("hosts_toml", "top-level", '''registry.example.com
ca = "/etc/ca.pem"
skip_verify = false
client = "/etc/client.pem"
[header]
  x-a = "b"
''')


def auth():
    for i, h in enumerate([
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull"',
        'Bearer realm="https://ghcr.io/token",service="ghcr.io",scope="repository:user/image:pull"',
        'Bearer realm="https://quay.io/v2/auth",service="quay.io"',
        'Basic realm="Registry Realm"',
        'Basic realm="x", Bearer realm="https://a/t",scope="repository:a:pull,push"',
        'Negotiate, Bearer realm=https://unquoted/token, service=svc',
        'Bearer realm="esc\\"aped\\\\",error="insufficient_scope"',
        'bearer',
        '',
    ]):
        put("www_authenticate", str(i), h)
    for i, t in enumerate([
        '{"token":"eyJhbGciOi","access_token":"eyJhbGciOi","expires_in":300,"issued_at":"2024-05-01T10:00:00.000Z"}',
        '{"access_token":"gho_x","expires_in":18446744073709551615}',
        '{"token":"t"}',
        '{"token":"","access_token":"a","expires_in":0,"scope":"repository:x:pull"}',
        '{"token":null,"expires_in":-5}',
        '{"token":"t","expires_in":1.5e300}',
    ]):
        put("token_response", str(i), t)


def h2_streams():
    # What grpc-go (the bare path and the percent-encoded path as :authority) and grpcio
    # ("unix:" and "unix://") wrote on a unix socket, recorded raw in seeds/h2/. The target
    # prepends the preface itself; the first byte picks the read size.
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    d = os.path.join(HERE, "h2")
    for name in sorted(os.listdir(d)):
        data = open(os.path.join(d, name), "rb").read()
        assert data.startswith(preface), name
        for piece in (0, 6, 255):
            put("h2_client_stream", "%s-%d" % (name[:-4], piece), bytes([piece]) + data[len(preface):])


pull_requests()
references()
config()
manifests()
hosts()
auth()
h2_streams()
