// cri-client: a CRI ImageService client on grpc-go (Debian's golang-google-grpc-dev), for
// pullgate's tests. It dials the socket the way crictl 1.29 does (k8s.io/cri-client: the target is
// the bare socket path and a context dialer opens the unix socket), so grpc-go sends the path as
// :authority. One call per run; its answer is one line of JSON on stdout (proto field names, proto3
// JSON mapping), or {"code": "<gRPC code name>", "message": "..."} when the call fails. Exit 0
// either way; 2 for a usage error.
//
//	cri-client [-escaped-authority] [-timeout 2m] SOCKET imagefsinfo|list
//	cri-client ... SOCKET pull IMAGE [-sandbox] [-auth USER:PASS]
//	cri-client ... SOCKET status IMAGE | remove IMAGE
//	cri-client ... SOCKET raw /pkg.Service/Method HEX    (request bytes as given)
//
// -escaped-authority sends the percent-encoded path as :authority instead (what newer grpc-go
// versions send for such a target).
package main

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/golang/protobuf/jsonpb"
	"github.com/golang/protobuf/proto"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"

	pb "pullgate.test/criapi"
)

const maxMessage = 16 * 1024 * 1024

// The gRPC spec's code names (grpc-go's String() says "NotFound"; the spec and Python say
// NOT_FOUND).
var codeNames = []string{"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
	"NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
	"FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE",
	"DATA_LOSS", "UNAUTHENTICATED"}

// rawCodec sends and receives message bytes as they are.
type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error)      { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v interface{}) error { *(v.(*[]byte)) = data; return nil }
func (rawCodec) Name() string                               { return "proto" }

func usage(msg string) {
	fmt.Fprintln(os.Stderr, "cri-client:", msg)
	os.Exit(2)
}

func sandboxConfig() *pb.PodSandboxConfig {
	// What kubelet sends for a pod (the same pod as the Rust harness's pull_request()).
	uid := "6b1d3c3e-0000-4000-8000-000000000001"
	return &pb.PodSandboxConfig{
		Metadata:     &pb.PodSandboxMetadata{Name: "harness-pod", Uid: uid, Namespace: "default"},
		Hostname:     "harness-pod",
		LogDirectory: "/var/log/pods/default_harness-pod_" + uid,
	}
}

func main() {
	escaped := flag.Bool("escaped-authority", false, "send the percent-encoded socket path as :authority")
	timeout := flag.Duration("timeout", 2*time.Minute, "deadline of the call")
	flag.Parse()
	args := flag.Args()
	if len(args) < 2 {
		usage("need SOCKET COMMAND [ARGS]")
	}
	socket, command, rest := args[0], args[1], args[2:]
	// Flags after the positional arguments (pull IMAGE -sandbox -auth u:p).
	sub := flag.NewFlagSet(command, flag.ExitOnError)
	sandbox := sub.Bool("sandbox", false, "send a pod sandbox config")
	auth := sub.String("auth", "", "USER:PASS")
	var positional []string
	for len(rest) > 0 {
		if strings.HasPrefix(rest[0], "-") {
			sub.Parse(rest)
			rest = sub.Args()
			continue
		}
		positional = append(positional, rest[0])
		rest = rest[1:]
	}
	need := func(n int) {
		if len(positional) != n {
			usage(fmt.Sprintf("%s takes %d argument(s)", command, n))
		}
	}

	opts := []grpc.DialOption{
		grpc.WithInsecure(),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", addr)
		}),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMessage), grpc.MaxCallSendMsgSize(maxMessage)),
	}
	if *escaped {
		opts = append(opts, grpc.WithAuthority(url.PathEscape(socket)))
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	conn, err := grpc.DialContext(ctx, socket, opts...)
	if err != nil {
		fail(err)
	}
	defer conn.Close()
	client := pb.NewImageServiceClient(conn)
	spec := func(image string) *pb.ImageSpec { return &pb.ImageSpec{Image: image} }

	var reply proto.Message
	switch command {
	case "imagefsinfo":
		need(0)
		reply, err = client.ImageFsInfo(ctx, &pb.ImageFsInfoRequest{})
	case "list":
		need(0)
		reply, err = client.ListImages(ctx, &pb.ListImagesRequest{})
	case "pull":
		need(1)
		req := &pb.PullImageRequest{Image: spec(positional[0])}
		if *sandbox {
			req.SandboxConfig = sandboxConfig()
		}
		if *auth != "" {
			user := strings.SplitN(*auth, ":", 2)
			if len(user) != 2 {
				usage("-auth wants USER:PASS")
			}
			req.Auth = &pb.AuthConfig{Username: user[0], Password: user[1]}
		}
		reply, err = client.PullImage(ctx, req)
	case "status":
		need(1)
		reply, err = client.ImageStatus(ctx, &pb.ImageStatusRequest{Image: spec(positional[0])})
	case "remove":
		need(1)
		reply, err = client.RemoveImage(ctx, &pb.RemoveImageRequest{Image: spec(positional[0])})
	case "raw":
		need(2)
		in, herr := hex.DecodeString(positional[1])
		if herr != nil {
			usage("raw: bad hex: " + herr.Error())
		}
		var out []byte
		if err = conn.Invoke(ctx, positional[0], &in, &out, grpc.ForceCodec(rawCodec{})); err == nil {
			print(map[string]string{"reply_hex": hex.EncodeToString(out)})
			return
		}
	default:
		usage("unknown command " + command)
	}
	if err != nil {
		fail(err)
	}
	text, err := (&jsonpb.Marshaler{OrigName: true}).MarshalToString(reply)
	if err != nil {
		usage("cannot render the reply: " + err.Error())
	}
	fmt.Println(text)
}

func fail(err error) {
	s := status.Convert(err)
	name := fmt.Sprintf("CODE_%d", s.Code())
	if int(s.Code()) < len(codeNames) {
		name = codeNames[s.Code()]
	}
	print(map[string]string{"code": name, "message": s.Message()})
	os.Exit(0)
}

func print(v map[string]string) {
	text, _ := json.Marshal(v)
	fmt.Println(string(text))
}
