//! The leases that keep a failed pull's downloads for its next attempt, kept only while they do
//! not stand between the node and its next pull.
//!
//! - A pull starts under its own lease unless containerd's root is below
//!   `mirror.keep_partial_min_free` (then containerd's own lease, gone with the pull).
//! - At most one kept lease per image: a retry's new lease takes in everything the earlier
//!   attempt's holds (containerd's `AddResource`, so nothing is freed in between), then the
//!   earlier one goes. Reusing the old lease instead would keep its expiry, which containerd
//!   cannot extend.
//! - A failed pull's lease is kept unless the disk is below the threshold (then deleted, with
//!   containerd's GC run before the call returns) or containerd said ENOSPC (then every kept lease
//!   goes: they hold partials of other images, and the node must be able to pull).
//! - The disk sampler drops every kept lease while the disk is below the threshold.
//! - At start, leases of an earlier pullgate are adopted (the newest per image; a restart mid-pull
//!   is what resumption is for) or, below the threshold, deleted.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{debug, info, warn};

use super::PullJob;
use crate::config::Share;
use crate::metrics::{Metrics, ReasonLabels};
use crate::upstream::disk::{self, Room};
use crate::upstream::leases::{Ours, LEASE_HEADER};
use crate::upstream::Leases;

/// What becomes of a failed pull's lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Kept for the next attempt (it expires by itself).
    Keep,
    /// Deleted at once: the disk is below the threshold.
    Drop,
    /// Deleted with every other kept lease: containerd ran out of space.
    DropAll,
}

/// The decision for a failed pull, from containerd's error and the disk's room (`None`: could
/// not be read; the lease is kept, as ENOSPC still frees it).
pub fn after_failure(message: &str, room: Option<Room>, min_free: Share) -> Verdict {
    if disk::is_full(message) {
        Verdict::DropAll
    } else if room.is_some_and(|r| r.pressure(min_free)) {
        Verdict::Drop
    } else {
        Verdict::Keep
    }
}

/// Which leases of an earlier process stay (image → lease) and which go. Below the threshold
/// all go; otherwise the newest per image stays, and leases without an image label (an older
/// pullgate's) stay under their own id, to expire or be dropped under pressure.
pub fn stale_plan(found: Vec<Ours>, pressure: bool) -> (HashMap<String, String>, Vec<String>) {
    let mut keep: HashMap<String, Ours> = HashMap::new();
    let mut delete = Vec::new();
    for l in found {
        if pressure {
            delete.push(l.id);
            continue;
        }
        let key = l.image.clone().unwrap_or_else(|| l.id.clone());
        match keep.get(&key) {
            Some(k) if (k.created, &k.id) >= (l.created, &l.id) => delete.push(l.id),
            _ => {
                if let Some(old) = keep.insert(key, l) {
                    delete.push(old.id);
                }
            }
        }
    }
    (keep.into_iter().map(|(k, l)| (k, l.id)).collect(), delete)
}

/// The lease of one forwarded pull. Dropped unsettled (every requester gone): kept.
pub struct PullLease {
    id: String,
    image: String,
    partials: Arc<Partials>,
    settled: bool,
}

impl Drop for PullLease {
    fn drop(&mut self) {
        if !self.settled {
            self.partials
                .keep(std::mem::take(&mut self.image), self.id.clone());
        }
    }
}

pub struct Partials {
    leases: Leases,
    /// How long a kept lease lives (`mirror.keep_partial`).
    expire: Duration,
    disk: disk::Watch,
    /// Unix ms of this process's start: lease ids and job labels stay unique across restarts.
    instance: u128,
    /// Kept leases by image.
    kept: Mutex<HashMap<String, String>>,
    metrics: Arc<Metrics>,
}

impl Partials {
    pub fn new(leases: Leases, expire: Duration, disk: disk::Watch, metrics: Arc<Metrics>) -> Self {
        let instance = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default();
        Partials {
            leases,
            expire,
            disk,
            instance,
            kept: Mutex::default(),
            metrics,
        }
    }

    pub fn leases(&self) -> &Leases {
        &self.leases
    }

    /// Creates the pull's lease, takes in the image's kept one, and names it in the forwarded
    /// request; `None` (containerd uses its own) below the threshold or when containerd refuses.
    pub async fn begin(self: &Arc<Self>, job: &mut PullJob) -> Option<PullLease> {
        if let Some(room) = self.disk.sample().filter(|r| self.disk.pressure(r)) {
            info!(
                free = %disk::human(room.free),
                "containerd's disk is below mirror.keep_partial_min_free: this pull's downloads \
                 are not kept if it fails"
            );
            return None;
        }
        let image = job.info.reference.clone();
        let id = format!("pullgate-{}-{}", self.instance, job.id);
        let value = http::HeaderValue::from_str(&id).ok()?;
        let label = format!("{}-{}", self.instance, job.id);
        if let Err(e) = self.leases.create(&id, &label, &image, self.expire).await {
            warn!(
                error = e.message(),
                "cannot create the pull's lease: an interrupted pull will start over"
            );
            return None;
        }
        let earlier = self.kept.lock().remove(&image);
        self.gauge();
        if let Some(old) = earlier {
            self.replace(&id, &old).await;
        }
        job.request.headers.insert(LEASE_HEADER, value);
        Some(PullLease {
            id,
            image,
            partials: self.clone(),
            settled: false,
        })
    }

    /// The pull succeeded: the image holds its content and the lease goes.
    pub async fn succeeded(&self, mut lease: PullLease) {
        lease.settled = true;
        if let Err(e) = self.leases.delete(&lease.id, false).await {
            debug!(
                lease = lease.id,
                error = e.message(),
                "lease not deleted; it expires by itself"
            );
        }
    }

    /// The pull failed with containerd's `message`: its lease is kept, dropped, or dropped with
    /// every kept one.
    pub async fn failed(&self, lease: Option<PullLease>, message: &str) {
        let room = self.disk.sample();
        let verdict = after_failure(message, room, self.disk.min_free());
        let mine = lease.map(|mut l| {
            l.settled = true;
            (std::mem::take(&mut l.image), l.id.clone())
        });
        match verdict {
            Verdict::Keep => {
                if let Some((image, id)) = mine {
                    self.keep(image, id);
                }
            }
            Verdict::Drop => {
                if let Some((_, id)) = mine {
                    self.delete_now(&[id], "low_disk").await;
                    let free = self.disk.sample().map(|r| disk::human(r.free));
                    warn!(
                        free = free.as_deref().unwrap_or("unknown"),
                        "containerd's disk is below mirror.keep_partial_min_free: the failed \
                           pull's downloads were dropped (the next attempt starts over)"
                    );
                }
            }
            Verdict::DropAll => {
                let mut ids: Vec<String> = mine.into_iter().map(|(_, id)| id).collect();
                ids.extend(self.take_kept());
                let started = std::time::Instant::now();
                let freed = self.delete_now(&ids, "disk_full").await;
                let free = self.disk.sample().map(|r| disk::human(r.free));
                warn!(leases = ?freed, free = free.as_deref().unwrap_or("unknown"),
                      took_ms = started.elapsed().as_millis() as u64,
                      "containerd ran out of disk space: pullgate's kept partial downloads were \
                       deleted so that the node can pull again");
            }
        }
    }

    /// Samples the disk (metrics) and, below the threshold, drops every kept lease.
    pub async fn sweep(&self) {
        let Some(room) = self.disk.sample() else {
            return;
        };
        if !self.disk.pressure(&room) || self.kept.lock().is_empty() {
            return;
        }
        let ids = self.take_kept();
        let freed = self.delete_now(&ids, "low_disk").await;
        let after = self.disk.sample().map(|r| disk::human(r.free));
        warn!(leases = ?freed, free_before = %disk::human(room.free),
              free = after.as_deref().unwrap_or("unknown"),
              "containerd's disk is below mirror.keep_partial_min_free: kept partial downloads \
               deleted");
    }

    /// Leases of an earlier pullgate process: adopted (newest per image) or deleted (below the
    /// threshold, and older attempts of an image).
    pub async fn adopt_stale(&self) {
        let found = match self.leases.list_ours().await {
            Ok(f) => f,
            Err(e) => {
                warn!(
                    error = e.message(),
                    "cannot list earlier pullgate leases: they expire by themselves"
                );
                return;
            }
        };
        if found.is_empty() {
            return;
        }
        let pressure = self.disk.sample().is_some_and(|r| self.disk.pressure(&r));
        let (keep, delete) = stale_plan(found, pressure);
        let kept = keep.len();
        self.kept.lock().extend(keep);
        self.gauge();
        let freed = self.delete_now(&delete, "stale").await;
        info!(kept, deleted = ?freed, disk_pressure = pressure,
              "leases of an earlier pullgate: the newest per image kept for resumption");
    }

    /// Keeps `id` as the image's lease; an earlier one's content moves into it first.
    fn keep(&self, image: String, id: String) {
        let displaced = self.kept.lock().insert(image, id.clone());
        self.gauge();
        if let Some(old) = displaced.filter(|o| *o != id) {
            let leases = self.leases.clone();
            tokio::spawn(async move { replace_with(&leases, &id, &old).await });
        }
    }

    async fn replace(&self, new: &str, old: &str) {
        replace_with(&self.leases, new, old).await
    }

    fn take_kept(&self) -> Vec<String> {
        let ids = self.kept.lock().drain().map(|(_, id)| id).collect();
        self.gauge();
        ids
    }

    /// Deletes `ids` with containerd's GC run before each call returns; the ids deleted.
    async fn delete_now(&self, ids: &[String], reason: &'static str) -> Vec<String> {
        let mut freed = Vec::new();
        for id in ids {
            match self.leases.delete(id, true).await {
                Ok(()) => {
                    self.metrics
                        .partials_dropped
                        .get_or_create(&ReasonLabels { reason })
                        .inc();
                    freed.push(id.clone());
                }
                Err(e) => warn!(lease = id, error = e.message(), "cannot delete the lease"),
            }
        }
        freed
    }

    fn gauge(&self) {
        let n = self.kept.lock().len();
        self.metrics.kept_partials.set(n as i64);
    }
}

/// `new` takes in what `old` holds, then `old` goes (nothing is freed). If containerd cannot
/// move it, `old` stays: two leases for a while beat a lost resumption.
async fn replace_with(leases: &Leases, new: &str, old: &str) {
    match leases.absorb(new, old).await {
        Ok(n) => {
            debug!(
                lease = new,
                earlier = old,
                resources = n,
                "earlier attempt's downloads taken in"
            );
            if let Err(e) = leases.delete(old, false).await {
                debug!(
                    lease = old,
                    error = e.message(),
                    "earlier lease not deleted; it expires by itself"
                );
            }
        }
        Err(e) => warn!(
            lease = new,
            earlier = old,
            error = e.message(),
            "cannot take in the earlier attempt's downloads: its lease stays until it expires"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENOSPC: &str = "failed to pull and unpack image \"127.0.0.1:5000/big:v1\": failed to copy: write /var/lib/containerd/io.containerd.content.v1.content/ingest/1f/data: no space left on device";

    fn room(free: u64) -> Option<Room> {
        Some(Room { free, size: 1000 })
    }

    #[test]
    fn a_failed_pull_keeps_its_lease_only_while_the_disk_has_room() {
        let min = Share::Percent(15);
        assert_eq!(after_failure("not found", room(500), min), Verdict::Keep);
        assert_eq!(after_failure("not found", room(100), min), Verdict::Drop);
        assert_eq!(after_failure(ENOSPC, room(500), min), Verdict::DropAll);
        assert_eq!(after_failure(ENOSPC, None, min), Verdict::DropAll);
        // The disk unreadable: kept (an ENOSPC still frees it).
        assert_eq!(after_failure("context canceled", None, min), Verdict::Keep);
        assert_eq!(after_failure("x", room(0), Share::Bytes(0)), Verdict::Keep);
    }

    fn ours(id: &str, image: Option<&str>, created: i64) -> Ours {
        Ours {
            id: id.into(),
            image: image.map(str::to_string),
            created,
        }
    }

    #[test]
    fn at_start_the_newest_lease_per_image_stays_unless_the_disk_is_low() {
        let found = vec![
            ours("pullgate-1-1", Some("r/a:v1"), 10),
            ours("pullgate-1-2", Some("r/a:v1"), 30),
            ours("pullgate-2-1", Some("r/a:v1"), 20),
            ours("pullgate-1-3", Some("r/b:v1"), 5),
            ours("pullgate-9-9", None, 1),
        ];
        let (keep, mut delete) = stale_plan(found.clone(), false);
        delete.sort();
        assert_eq!(keep.len(), 3, "{keep:?}");
        assert_eq!(keep["r/a:v1"], "pullgate-1-2");
        assert_eq!(keep["r/b:v1"], "pullgate-1-3");
        assert_eq!(keep["pullgate-9-9"], "pullgate-9-9");
        assert_eq!(delete, vec!["pullgate-1-1", "pullgate-2-1"]);

        let (keep, delete) = stale_plan(found, true);
        assert!(keep.is_empty());
        assert_eq!(delete.len(), 5);
    }
}
