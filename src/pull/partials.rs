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
//! - A pod's pull does not wait for its lease: creating one is a write to containerd's metadata
//!   store, which waits on the disk (measured: 1.5 ms on an idle node, 14–384 ms while a 1 GiB
//!   prewarm was being written and unpacked, all of it before containerd began the pod's pull).
//!   It takes a *spare* lease made ahead of need. The image's own lease (labelled with the
//!   image and the spare's id) and the next spare are made only once the pull ends or has run
//!   for [`PAIR_DELAY`]: pullgate's writes would make the pod's own metadata writes queue. The
//!   spare's content moves into the image's lease when the pull fails, or when a restarted
//!   pullgate adopts them (a spare killed before its pair was made is kept by its own id until
//!   it expires).

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{debug, info, warn};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::task::JoinHandle;

use super::PullJob;
use crate::config::Share;
use crate::metrics::{Metrics, ReasonLabels};
use crate::upstream::disk::{self, Room};
use crate::upstream::leases::{Mark, Ours, LEASE_HEADER};
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

/// What becomes of an earlier process's spare leases, given the image leases kept.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SparePlan {
    /// (kept image lease, its spare): the spare's content moves into the image's lease.
    pub absorb: Vec<(String, String)>,
    pub delete: Vec<String>,
    /// Named by no image lease: deleted if empty (never used), else kept until it expires.
    pub unclaimed: Vec<String>,
}

/// `pairs`: (image lease, the spare it names) of every image lease found; `kept`: the ids of
/// those that stay. Below the threshold every spare goes.
pub fn spare_plan(
    spares: Vec<String>,
    pairs: &[(String, String)],
    kept: &[String],
    pressure: bool,
) -> SparePlan {
    let mut plan = SparePlan::default();
    for spare in spares {
        let named_by = pairs.iter().find(|(_, s)| *s == spare).map(|(l, _)| l);
        match named_by {
            _ if pressure => plan.delete.push(spare),
            Some(lease) if kept.contains(lease) => plan.absorb.push((lease.clone(), spare)),
            // An older attempt's spare: it goes with that attempt's lease.
            Some(_) => plan.delete.push(spare),
            None => plan.unclaimed.push(spare),
        }
    }
    plan
}

/// A pod's pull gives containerd's metadata store this long before pullgate writes to it for
/// that pull (the image's own lease beside the spare, the next spare): under a big prewarm each
/// write waits on the disk (92 ms measured), and the pod's own writes queue behind it. Most pod
/// pulls on a fast link end sooner, and then the image's lease is never needed.
const PAIR_DELAY: Duration = Duration::from_secs(1);

/// The image's own lease beside the spare a pod's pull runs under: made after [`PAIR_DELAY`],
/// at once when the pull fails, not at all when it succeeds sooner.
struct Pair {
    /// `None` once done: not made, or containerd refused it.
    made: JoinHandle<Option<String>>,
    /// `true`: make it now; `false`: not at all.
    go: tokio::sync::oneshot::Sender<bool>,
}

impl Pair {
    /// The image's lease, made now if it was not yet.
    async fn now(self) -> Option<String> {
        let _ = self.go.send(true);
        self.made.await.ok().flatten()
    }

    /// The image's lease if it was made already (for the caller to delete); else never made.
    async fn cancel(self) -> Option<String> {
        let _ = self.go.send(false);
        self.made.await.ok().flatten()
    }
}

/// The lease of one forwarded pull. Dropped unsettled (every requester gone): kept.
pub struct PullLease {
    id: String,
    image: String,
    partials: Arc<Partials>,
    settled: bool,
    /// `id` is a spare: the image's own lease.
    pair: Option<Pair>,
}

impl PullLease {
    /// Settles the lease: its image, id and pair, for the caller to keep or delete.
    fn settle(&mut self) -> (String, String, Option<Pair>) {
        self.settled = true;
        (
            std::mem::take(&mut self.image),
            self.id.clone(),
            self.pair.take(),
        )
    }
}

impl Drop for PullLease {
    fn drop(&mut self) {
        if !self.settled {
            let (image, id, pair) = self.settle();
            self.partials.keep(image, id, pair);
        }
    }
}

/// A lease made ahead for the next pod's pull.
struct Spare {
    id: String,
    made: std::time::Instant,
}

impl Spare {
    /// Young enough to serve a pull: the pull must have at least half the expiry left.
    fn fresh(&self, expire: Duration) -> bool {
        self.made.elapsed() < expire / 2
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
    spare: Mutex<Option<Spare>>,
    /// A spare is being made.
    making: AtomicBool,
    spares_made: AtomicU64,
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
            spare: Mutex::default(),
            making: AtomicBool::new(false),
            spares_made: AtomicU64::new(0),
        }
    }

    /// Makes a spare lease in the background unless one is there (and fresh) or being made.
    /// A spare older than half the expiry is replaced: the pull it serves must have the rest.
    pub fn refill_spare(self: &Arc<Self>) {
        let fresh = self
            .spare
            .lock()
            .as_ref()
            .is_some_and(|s| s.fresh(self.expire));
        if fresh || self.making.swap(true, Ordering::SeqCst) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let n = me.spares_made.fetch_add(1, Ordering::Relaxed) + 1;
            let id = format!("pullgate-spare-{}-{n}", me.instance);
            let job = format!("{}-spare-{n}", me.instance);
            let made = std::time::Instant::now();
            match me
                .leases
                .create_labelled(&id, &job, Mark::Spare, me.expire)
                .await
            {
                Ok(()) => {
                    debug!(lease = id, took = ?made.elapsed(), "spare lease made for the next pod's pull");
                    let old = me.spare.lock().replace(Spare { id, made });
                    if let Some(old) = old {
                        let _ = me.leases.delete(&old.id, false).await;
                    }
                }
                Err(e) => debug!(
                    error = e.message(),
                    "cannot make a spare lease: the next pod's pull makes its own"
                ),
            }
            me.making.store(false, Ordering::SeqCst);
        });
    }

    /// The spare, if one is ready and fresh (a stale one is deleted). The next is made once the
    /// pull has ended or had [`PAIR_DELAY`], off its metadata writes.
    fn take_spare(self: &Arc<Self>) -> Option<String> {
        let spare = self.spare.lock().take();
        match spare {
            Some(s) if s.fresh(self.expire) => Some(s.id),
            Some(stale) => {
                let leases = self.leases.clone();
                tokio::spawn(async move { leases.delete(&stale.id, false).await });
                None
            }
            None => None,
        }
    }

    /// The lease id and job label of `job`'s own lease (unique across restarts).
    fn names(&self, job: &PullJob) -> (String, String) {
        let label = format!("{}-{}", self.instance, job.id);
        (format!("pullgate-{label}"), label)
    }

    /// A pod's pull under the spare `spare`: the image's own lease is made beside it, and the
    /// image's kept lease is taken in, both off the pod's path.
    fn begin_on_spare(self: &Arc<Self>, job: &mut PullJob, spare: String) -> Option<PullLease> {
        let value = http::HeaderValue::from_str(&spare).ok()?;
        let image = job.info.reference.clone();
        let (me, (id, label)) = (self.clone(), self.names(job));
        let (for_image, of_spare) = (image.clone(), spare.clone());
        let (go, decided) = tokio::sync::oneshot::channel();
        let made = tokio::spawn(async move {
            let make = tokio::select! {
                () = tokio::time::sleep(PAIR_DELAY) => true,
                // The lease dropped unsettled: kept, so made.
                r = decided => r.unwrap_or(true),
            };
            if !make {
                return None;
            }
            me.refill_spare();
            let mark = Mark::Image {
                image: &for_image,
                pair: Some(&of_spare),
            };
            match me
                .leases
                .create_labelled(&id, &label, mark, me.expire)
                .await
            {
                Ok(()) => Some(id),
                Err(e) => {
                    warn!(error = e.message(), "cannot create the pull's lease: its downloads are kept under the spare lease, not found again after a restart");
                    None
                }
            }
        });
        if let Some(old) = self.kept.lock().remove(&image) {
            let (leases, into) = (self.leases.clone(), spare.clone());
            tokio::spawn(async move { replace_with(&leases, &into, &old).await });
        }
        self.gauge();
        job.request.headers.insert(LEASE_HEADER, value);
        Some(PullLease {
            id: spare,
            image,
            partials: self.clone(),
            settled: false,
            pair: Some(Pair { made, go }),
        })
    }

    pub fn leases(&self) -> &Leases {
        &self.leases
    }

    /// Creates the pull's lease, takes in the image's kept one, and names it in the forwarded
    /// request; `None` (containerd uses its own) below the threshold or when containerd refuses.
    /// A pod's pull (`urgent`) takes the spare lease when there is one.
    pub async fn begin(self: &Arc<Self>, job: &mut PullJob, urgent: bool) -> Option<PullLease> {
        if let Some(room) = self.disk.sample().filter(|r| self.disk.pressure(r)) {
            info!(
                free = %disk::human(room.free),
                "containerd's disk is below mirror.keep_partial_min_free: this pull's downloads \
                 are not kept if it fails"
            );
            return None;
        }
        if let Some(spare) = urgent.then(|| self.take_spare()).flatten() {
            return self.begin_on_spare(job, spare);
        }
        let image = job.info.reference.clone();
        let (id, label) = self.names(job);
        let value = http::HeaderValue::from_str(&id).ok()?;
        let asked = std::time::Instant::now();
        let created = self.leases.create(&id, &label, &image, self.expire).await;
        debug!(lease = id, took = ?asked.elapsed(), "pull's lease created");
        if let Err(e) = created {
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
            pair: None,
        })
    }

    /// The pull succeeded: the image holds its content and the lease goes (with its pair).
    pub async fn succeeded(self: &Arc<Self>, mut lease: PullLease) {
        let ids = lease_ids(Some(lease.settle())).await;
        self.refill_spare();
        for id in ids {
            if let Err(e) = self.leases.delete(&id, false).await {
                debug!(
                    lease = id,
                    error = e.message(),
                    "lease not deleted; it expires by itself"
                );
            }
        }
    }

    /// The pull failed with containerd's `message`: its lease is kept, dropped, or dropped with
    /// every kept one.
    pub async fn failed(self: &Arc<Self>, lease: Option<PullLease>, message: &str) {
        let room = self.disk.sample();
        let verdict = after_failure(message, room, self.disk.min_free());
        let mine = lease.map(|mut l| l.settle());
        match verdict {
            Verdict::Keep => {
                if let Some((image, id, pair)) = mine {
                    self.keep(image, id, pair);
                }
            }
            Verdict::Drop => {
                let ids = lease_ids(mine).await;
                if !ids.is_empty() {
                    self.delete_now(&ids, "low_disk").await;
                    let free = self.disk.sample().map(|r| disk::human(r.free));
                    warn!(
                        free = free.as_deref().unwrap_or("unknown"),
                        "containerd's disk is below mirror.keep_partial_min_free: the failed \
                           pull's downloads were dropped (the next attempt starts over)"
                    );
                }
            }
            Verdict::DropAll => {
                let mut ids = lease_ids(mine).await;
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
        // After the deletions: on a full disk they come first.
        self.refill_spare();
    }

    /// Samples the disk (metrics) and, below the threshold, drops every kept lease. Keeps a
    /// fresh spare lease ready.
    pub async fn sweep(self: &Arc<Self>) {
        self.refill_spare();
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
        let (spares, found): (Vec<Ours>, Vec<Ours>) = found.into_iter().partition(|l| l.spare);
        let pairs: Vec<(String, String)> = found
            .iter()
            .filter_map(|l| Some((l.id.clone(), l.pair.clone()?)))
            .collect();
        let (keep, mut delete) = stale_plan(found, pressure);
        let kept_ids: Vec<String> = keep.values().cloned().collect();
        let spares = spares.into_iter().map(|l| l.id).collect();
        let plan = spare_plan(spares, &pairs, &kept_ids, pressure);
        let kept = keep.len();
        self.kept.lock().extend(keep);
        self.gauge();
        for (into, spare) in &plan.absorb {
            replace_with(&self.leases, into, spare).await;
        }
        delete.extend(plan.delete);
        for spare in plan.unclaimed {
            match self.leases.resource_count(&spare).await {
                Ok(0) => delete.push(spare),
                _ => {
                    self.kept.lock().insert(spare.clone(), spare);
                }
            }
        }
        let freed = self.delete_now(&delete, "stale").await;
        info!(kept, deleted = ?freed, spares_taken_in = plan.absorb.len(), disk_pressure = pressure,
              "leases of an earlier pullgate: the newest per image kept for resumption");
    }

    /// Keeps the pull's lease as the image's. A spare is first moved into the image's own lease
    /// (`pair`, once made), so that a restarted pullgate finds it by image.
    fn keep(self: &Arc<Self>, image: String, id: String, pair: Option<Pair>) {
        let Some(pair) = pair else {
            return self.keep_id(image, id);
        };
        let me = self.clone();
        tokio::spawn(async move {
            match pair.now().await {
                Some(own) => {
                    replace_with(&me.leases, &own, &id).await;
                    me.keep_id(image, own);
                }
                None => me.keep_id(image, id),
            }
        });
    }

    /// Keeps `id` as the image's lease; an earlier one's content moves into it first.
    fn keep_id(&self, image: String, id: String) {
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

/// The ids of a settled pull lease that is to go: its own and its pair's, if that was made
/// (a pair not made yet never will be).
async fn lease_ids(settled: Option<(String, String, Option<Pair>)>) -> Vec<String> {
    let Some((_, id, pair)) = settled else {
        return Vec::new();
    };
    let mut ids = vec![id];
    if let Some(p) = pair {
        ids.extend(p.cancel().await);
    }
    ids
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
            pair: None,
            spare: false,
        }
    }

    #[test]
    fn at_start_a_spare_goes_into_the_kept_image_lease_that_names_it() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let pairs = vec![
            ("pullgate-1-2".to_string(), "pullgate-spare-1-1".to_string()),
            ("pullgate-1-1".to_string(), "pullgate-spare-1-0".to_string()),
        ];
        let spares = s(&[
            "pullgate-spare-1-0",
            "pullgate-spare-1-1",
            "pullgate-spare-1-2",
        ]);
        let plan = spare_plan(spares.clone(), &pairs, &s(&["pullgate-1-2"]), false);
        assert_eq!(
            plan.absorb,
            vec![("pullgate-1-2".to_string(), "pullgate-spare-1-1".to_string())]
        );
        assert_eq!(plan.delete, s(&["pullgate-spare-1-0"]));
        assert_eq!(plan.unclaimed, s(&["pullgate-spare-1-2"]));
        let low = spare_plan(spares, &pairs, &s(&["pullgate-1-2"]), true);
        assert_eq!(low.delete.len(), 3);
        assert!(low.absorb.is_empty() && low.unclaimed.is_empty());
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
