//! pullgate as containerd's registry mirror (issue: the byte path through containerd's own door).
//!
//! containerd tries the `[host]` entries of `<config_path>/<registry>/hosts.toml` in file order,
//! then the registry itself. Observed on containerd 1.6.20, 1.7.24 and 2.1.9
//! (`tests/containerd_mirror.rs`): every manifest and blob request to a mirror carries
//! `ns=<registry>`, and a mirror that answers 404, 500 or 503, or whose port is closed, makes
//! containerd fetch from the next host, so the pull still succeeds. pullgate's mirror relies on
//! both: `ns` tells it where to go upstream, and the fallback keeps pulls working when pullgate
//! is down.
//!
//! So far: [`hosts_file`], pullgate's entry in those files. The HTTP endpoint comes next.

pub mod hosts_file;
