//! containerd's content store, read-only, for assertions: what is committed, what is half
//! written (ingests). The `k8s.io` namespace (the CRI plugin's).

use std::path::Path;

use pullgate::proto::containerd::content::v1::content_client::ContentClient;
use pullgate::proto::containerd::content::v1::{InfoRequest, ListStatusesRequest};
use tonic::transport::Channel;

pub struct Store {
    channel: Channel,
}

fn k8s<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("containerd-namespace", "k8s.io".parse().unwrap());
    req
}

impl Store {
    pub fn new(socket: &Path) -> Store {
        Store {
            channel: super::uds_channel_now(socket),
        }
    }

    /// Whether blob `digest` is committed.
    pub async fn has(&self, digest: &str) -> bool {
        let req = k8s(InfoRequest {
            digest: digest.to_string(),
        });
        match ContentClient::new(self.channel.clone()).info(req).await {
            Ok(_) => true,
            Err(s) if s.code() == tonic::Code::NotFound => false,
            Err(s) => panic!("content Info {digest}: {s:?}"),
        }
    }

    /// Unfinished ingests: (ref, bytes written, expected digest).
    pub async fn ingests(&self) -> Vec<(String, i64, String)> {
        let req = k8s(ListStatusesRequest { filters: vec![] });
        ContentClient::new(self.channel.clone())
            .list_statuses(req)
            .await
            .expect("content ListStatuses")
            .into_inner()
            .statuses
            .into_iter()
            .map(|s| (s.r#ref, s.offset, s.expected))
            .collect()
    }
}
