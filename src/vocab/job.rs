//! A job's origin and state: what the job board records, the scheduler and the mirror read, and
//! the API and metrics print.

use std::fmt;

/// Where a job was asked for first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A CRI `PullImage` (kubelet, kruise-daemon, crictl).
    Cri,
    /// A `[[prewarm]]` entry of the config file, with its position (the lane's tie-break).
    Config(u32),
    /// pullgate's own API (`pullgate prewarm`).
    Api,
}

impl Origin {
    pub fn as_str(&self) -> &'static str {
        match self {
            Origin::Cri => "cri",
            Origin::Config(_) => "config",
            Origin::Api => "api",
        }
    }

    /// Configured order: config entries first, in file order.
    pub fn order(&self) -> u32 {
        match self {
            Origin::Config(i) => *i,
            _ => u32::MAX,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobState {
    /// Prewarm held until the P2P component is ready.
    WaitingForP2p,
    /// Reading the manifest to learn the blobs and the size.
    Resolving,
    /// Waiting for a slot (prewarm cap, large-image lane).
    Queued,
    Fetching,
    /// Blobs are in; containerd unpacks and records the image.
    Finishing,
    Done,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn as_str(&self) -> &'static str {
        match self {
            JobState::WaitingForP2p => "waiting-for-p2p",
            JobState::Resolving => "resolving",
            JobState::Queued => "queued",
            JobState::Fetching => "fetching",
            JobState::Finishing => "finishing",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            JobState::Done | JobState::Failed | JobState::Cancelled
        )
    }

    pub const ALL: [JobState; 8] = [
        JobState::WaitingForP2p,
        JobState::Resolving,
        JobState::Queued,
        JobState::Fetching,
        JobState::Finishing,
        JobState::Done,
        JobState::Failed,
        JobState::Cancelled,
    ];
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
