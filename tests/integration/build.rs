//! The kubelet's pod-resources gRPC server side, generated from the proto the agent vendors,
//! for the attribution tests' stand-in of the kubelet socket.

fn main() {
    let proto = "../../agent/proto/k8s.io/kubelet/pkg/apis/podresources/v1/api.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds =
        protox::compile([proto], ["../../agent/proto"]).expect("compile the pod-resources proto");
    tonic_prost_build::configure()
        .build_client(false)
        .compile_fds(fds)
        .expect("generate the pod-resources server");
}
