//! What the mirror serves: the manifests pullgate resolved and the blobs of the jobs it admitted,
//! each with the jobs that need it.
//!
//! A job registers its image when it is admitted and leaves when containerd's pull ends (the
//! [`Registration`] guard). A blob needed by several jobs is streamed once per containerd request
//! at the class of the highest of them, re-read on every chunk, so a pod joining a prewarm job's
//! layer (or a promotion) speeds up a stream already open. A job's credentials are used only for
//! its own blobs and manifests, in its own repository, while it is registered, and only for a
//! request that presents the same credentials: containerd sends a CRI pull's credentials to a
//! mirror that challenges it with 401 (observed on 1.6, 1.7 and 2.1), so a pull with other (or
//! no) credentials never reads through another job's. Content a job read anonymously is public.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{watch, Notify};

use crate::jobs::progress::BlobProgress;
use crate::jobs::JobRecord;
use crate::registry::{Credentials, Descriptor, FetchedManifest, ImageRef, Resolved};
use crate::vocab::Class;
use crate::vocab::Priority;

/// Where a manifest or blob lives: `ns` (the registry containerd names), repository, and a digest
/// (or, for the manifest a pull names, its tag).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub registry: String,
    pub repository: String,
    pub name: String,
}

impl Key {
    fn of(image: &ImageRef, name: &str) -> Key {
        Key {
            registry: image.registry.clone(),
            repository: image.repository.clone(),
            name: name.to_string(),
        }
    }
}

/// One job's need of a blob.
struct Need {
    job: u64,
    record: Arc<JobRecord>,
    image: ImageRef,
    creds: Credentials,
    progress: Arc<BlobProgress>,
}

struct BlobEntry {
    descriptor: Descriptor,
    needs: Vec<Need>,
}

struct ManifestEntry {
    manifest: FetchedManifest,
    jobs: Vec<(u64, Credentials)>,
}

/// The credentials a mirror request carried (`Authorization: Basic`).
#[derive(Clone, PartialEq, Eq)]
pub struct Presented {
    pub username: String,
    pub password: String,
}

impl Presented {
    /// Parses an `Authorization` header value; `None` for anything but valid Basic.
    pub fn from_header(value: &str) -> Option<Presented> {
        let (scheme, b64) = value.trim().split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let (username, password) = crate::registry::auth::decode_basic(b64)?;
        Some(Presented { username, password })
    }
}

/// May a request presenting `presented` read what a job with `creds` read?
fn admits(creds: &Credentials, presented: Option<&Presented>) -> bool {
    match (creds, presented) {
        (Credentials::Anonymous, _) => true,
        (Credentials::Basic { username, password }, Some(p)) => {
            *username == p.username && *password == p.password
        }
        // containerd answers a Basic challenge with ("", token) for an identity token.
        (Credentials::IdentityToken { username, token }, Some(p)) => {
            username.as_deref().unwrap_or("") == p.username && *token == p.password
        }
        _ => false,
    }
}

/// What a request may read.
pub enum Access<T> {
    Granted(T),
    /// Only jobs with credentials need it, and the request presented none: answer 401 with a
    /// Basic challenge, and containerd asks again with the pull's credentials.
    Challenge,
    /// Not for this request: containerd fetches it from its next host.
    Unknown,
}

#[derive(Default)]
struct State {
    blobs: HashMap<Key, BlobEntry>,
    /// The keys of `blobs` by digest: a blob's class is read per chunk, across repositories.
    by_digest: HashMap<String, Vec<Key>>,
    manifests: HashMap<Key, ManifestEntry>,
    /// Resolutions in flight per (registry, repository): an urgent pull is forwarded while
    /// pullgate still resolves it, and the mirror holds its first requests until they land.
    resolving: HashMap<(String, String), usize>,
    /// Every registry a job was registered for since start: the mirror may fetch blobs no job
    /// needs from these (a registry the node really uses), never from an arbitrary `ns`.
    seen: std::collections::HashSet<String>,
}

/// How long a request for content nothing registered waits while pullgate still resolves an
/// urgent pull of that repository.
pub const HOLD_EARLY: std::time::Duration = std::time::Duration::from_secs(10);

/// The demand table, shared by the pull path (writer) and the mirror (reader).
#[derive(Default)]
pub struct Demand {
    state: Mutex<State>,
    /// Woken whenever a resolution ends.
    settled: Notify,
}

/// What serving one blob request needs: where to fetch it and with which credentials (those of
/// the highest-priority job needing it when the request came in).
#[derive(Clone)]
pub struct BlobSource {
    pub key: Key,
    pub descriptor: Descriptor,
    pub image: ImageRef,
    pub creds: Credentials,
    /// The job whose credentials these are.
    pub job: u64,
    /// That job's priority, watched (for stream slots).
    pub priority: watch::Receiver<Priority>,
}

impl std::fmt::Debug for BlobSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobSource")
            .field("key", &self.key)
            .field("job", &self.job)
            .finish_non_exhaustive()
    }
}

impl Demand {
    pub fn new() -> Arc<Demand> {
        Arc::default()
    }

    /// Whether a job of `registry` was registered since start.
    pub fn has_seen(&self, registry: &str) -> bool {
        self.state.lock().seen.contains(registry)
    }

    /// Registers `resolved` (the image of job `record`, fetched with `creds`): its manifests
    /// under the reference's tag or digest and their digests, its config and layers as blobs.
    /// Blob progress is added to the job's record. Everything goes when the guard drops.
    pub fn register(
        self: &Arc<Self>,
        record: &Arc<JobRecord>,
        image: &ImageRef,
        creds: &Credentials,
        resolved: &Resolved,
    ) -> Registration {
        let job = record.id;
        let mut keys = Vec::new();
        let mut st = self.state.lock();
        if !st.seen.contains(&image.registry) {
            st.seen.insert(image.registry.clone());
        }
        let outer = resolved.index.as_ref().unwrap_or(&resolved.manifest);
        let mut manifests = vec![(image.manifest_reference().to_string(), outer)];
        for m in resolved.index.iter().chain([&resolved.manifest]) {
            manifests.push((m.descriptor.digest().to_string(), m));
        }
        for (name, m) in manifests {
            let key = Key::of(image, &name);
            let entry = st
                .manifests
                .entry(key.clone())
                .or_insert_with(|| ManifestEntry {
                    manifest: m.clone(),
                    jobs: Vec::new(),
                });
            if !entry.jobs.iter().any(|(j, _)| *j == job) {
                entry.jobs.push((job, creds.clone()));
            }
            keys.push((true, key));
        }
        for desc in std::iter::once(&resolved.config).chain(&resolved.layers) {
            let key = Key::of(image, desc.digest().as_ref());
            if !st.blobs.contains_key(&key) {
                st.by_digest
                    .entry(key.name.clone())
                    .or_default()
                    .push(key.clone());
            }
            let entry = st.blobs.entry(key.clone()).or_insert_with(|| BlobEntry {
                descriptor: desc.clone(),
                needs: Vec::new(),
            });
            if entry.needs.iter().any(|n| n.job == job) {
                continue; // the same blob twice in one image
            }
            let progress = BlobProgress::new(desc.digest().to_string(), desc.size());
            record.progress.add(progress.clone());
            entry.needs.push(Need {
                job,
                record: record.clone(),
                image: image.clone(),
                creds: creds.clone(),
                progress,
            });
            keys.push((false, key));
        }
        Registration {
            demand: self.clone(),
            job,
            keys,
        }
    }

    /// Marks a resolution of `image` in flight until the guard drops (after its registration).
    pub fn resolving(self: &Arc<Self>, image: &ImageRef) -> Resolving {
        let repo = (image.registry.clone(), image.repository.clone());
        *self.state.lock().resolving.entry(repo.clone()).or_default() += 1;
        Resolving {
            demand: self.clone(),
            repo,
        }
    }

    /// Waits, at most `max`, until no resolution in `key`'s repository is in flight: a request
    /// that finds nothing registered may be early, not unknown. `true` when it waited.
    async fn settle(&self, key: &Key, max: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + max;
        let mut waited = false;
        loop {
            let woken = self.settled.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let pending = {
                let st = self.state.lock();
                st.resolving
                    .contains_key(&(key.registry.clone(), key.repository.clone()))
            };
            if !pending {
                return waited;
            }
            waited = true;
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                return waited;
            }
        }
    }

    /// `lookup` of `key`, asked again once an urgent pull's resolution in its repository lands
    /// (at most [`HOLD_EARLY`]) when it first finds nothing: the pull was forwarded before its
    /// resolution, so containerd may ask first.
    pub async fn after_resolution<T>(
        &self,
        key: &Key,
        lookup: impl Fn() -> Access<T>,
    ) -> Access<T> {
        match lookup() {
            Access::Unknown if self.settle(key, HOLD_EARLY).await => lookup(),
            access => access,
        }
    }

    /// The manifest registered under `key` (tag or digest), if a running job whose credentials
    /// the request presents resolved it.
    pub fn manifest(&self, key: &Key, presented: Option<&Presented>) -> Access<FetchedManifest> {
        let st = self.state.lock();
        let Some(e) = st.manifests.get(key) else {
            return Access::Unknown;
        };
        if e.jobs.iter().any(|(_, c)| admits(c, presented)) {
            return Access::Granted(e.manifest.clone());
        }
        if presented.is_none() {
            return Access::Challenge;
        }
        Access::Unknown
    }

    /// Where to fetch blob `key`, if a running job whose credentials the request presents needs
    /// it (the highest-priority such job's credentials are used upstream).
    pub fn blob(&self, key: &Key, presented: Option<&Presented>) -> Access<BlobSource> {
        let st = self.state.lock();
        let Some(entry) = st.blobs.get(key) else {
            return Access::Unknown;
        };
        let Some(top) = entry
            .needs
            .iter()
            .filter(|n| admits(&n.creds, presented))
            .max_by_key(|n| n.record.priority())
        else {
            return if presented.is_none() {
                Access::Challenge
            } else {
                Access::Unknown
            };
        };
        Access::Granted(BlobSource {
            key: key.clone(),
            descriptor: entry.descriptor.clone(),
            image: top.image.clone(),
            creds: top.creds.clone(),
            job: top.job,
            priority: top.record.watch_priority(),
        })
    }

    /// Where to fetch blob `key` for job `job`'s own use, if that job needs it.
    pub fn blob_of_job(&self, key: &Key, job: u64) -> Option<BlobSource> {
        let st = self.state.lock();
        let entry = st.blobs.get(key)?;
        let need = entry.needs.iter().find(|n| n.job == job)?;
        Some(BlobSource {
            key: key.clone(),
            descriptor: entry.descriptor.clone(),
            image: need.image.clone(),
            creds: need.creds.clone(),
            job,
            priority: need.record.watch_priority(),
        })
    }

    /// The class blob `key` is served at now: the highest of the jobs needing that digest, in
    /// any repository (containerd downloads a digest once, and a pull needing it waits on the
    /// download in flight, so a pod's layer shared with a prewarm image must not stay at prewarm
    /// pace); `unknown` when no job needs it (any more).
    pub fn class(&self, key: &Key, unknown: Class) -> Class {
        let st = self.state.lock();
        st.by_digest
            .get(&key.name)
            .into_iter()
            .flatten()
            .filter_map(|k| st.blobs.get(k))
            .flat_map(|e| e.needs.iter())
            .map(|n| n.record.priority().class())
            .max()
            .unwrap_or(unknown)
    }

    /// Records that `done` bytes of blob `key` have reached containerd, for every job needing it.
    pub fn progress(&self, key: &Key, done: u64) {
        let st = self.state.lock();
        if let Some(entry) = st.blobs.get(key) {
            for n in &entry.needs {
                if done > n.progress.done() {
                    n.progress.set(done);
                    if done >= n.progress.total {
                        n.record.progress.blob_complete();
                    }
                }
            }
        }
    }

    /// Blobs and manifests registered (for tests and status).
    pub fn len(&self) -> (usize, usize) {
        let st = self.state.lock();
        (st.blobs.len(), st.manifests.len())
    }

    fn remove(&self, job: u64, keys: &[(bool, Key)]) {
        let mut st = self.state.lock();
        for (is_manifest, key) in keys {
            if *is_manifest {
                if let Some(e) = st.manifests.get_mut(key) {
                    e.jobs.retain(|(j, _)| *j != job);
                    if e.jobs.is_empty() {
                        st.manifests.remove(key);
                    }
                }
            } else if let Some(e) = st.blobs.get_mut(key) {
                e.needs.retain(|n| n.job != job);
                if e.needs.is_empty() {
                    st.blobs.remove(key);
                    if let Some(keys) = st.by_digest.get_mut(&key.name) {
                        keys.retain(|k| k != key);
                        if keys.is_empty() {
                            st.by_digest.remove(&key.name);
                        }
                    }
                }
            }
        }
    }
}

/// A job's place in the demand table; dropping it takes the job's needs (and credentials) out.
pub struct Registration {
    demand: Arc<Demand>,
    job: u64,
    keys: Vec<(bool, Key)>,
}

/// A resolution in flight ([`Demand::resolving`]).
pub struct Resolving {
    demand: Arc<Demand>,
    repo: (String, String),
}

impl Drop for Resolving {
    fn drop(&mut self) {
        {
            let mut st = self.demand.state.lock();
            if let Some(n) = st.resolving.get_mut(&self.repo) {
                *n -= 1;
                if *n == 0 {
                    st.resolving.remove(&self.repo);
                }
            }
        }
        self.demand.settled.notify_waiters();
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.demand.remove(self.job, &self.keys);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::JobBoard;
    use crate::registry::{FetchedManifest, Source};
    use crate::vocab::Origin;
    use bytes::Bytes;
    use oci_spec::image::{Digest, MediaType};
    use std::str::FromStr;

    #[test]
    fn a_panic_while_the_table_is_locked_does_not_fail_later_pulls() {
        let demand = Demand::new();
        let held = demand.clone();
        // A bug that panics inside a critical section (caught, as tokio catches a task's panic).
        let r = std::thread::spawn(move || {
            let _guard = held.state.lock();
            panic!("a bug while the demand table is locked");
        })
        .join();
        assert!(r.is_err());
        // With std's Mutex the lock would now be poisoned and every `.lock()` panic.
        let key = Key {
            registry: "r.test".into(),
            repository: "app".into(),
            name: format!("sha256:{}", "a".repeat(64)),
        };
        assert_eq!(demand.class(&key, Class::Prewarm), Class::Prewarm);
        assert!(!demand.has_seen("r.test"));
    }

    fn desc(hex: char, size: u64) -> Descriptor {
        let d = Digest::from_str(&format!("sha256:{}", hex.to_string().repeat(64))).unwrap();
        Descriptor::new(MediaType::ImageLayerGzip, size, d)
    }

    fn resolved(layers: &[char]) -> Resolved {
        Resolved {
            index: None,
            manifest: FetchedManifest {
                descriptor: desc('a', 10),
                bytes: Bytes::from_static(b"{}"),
            },
            config: desc('c', 5),
            layers: layers.iter().map(|c| desc(*c, 100)).collect(),
            source: Source::Registry,
        }
    }

    fn record(board: &JobBoard, id: u64, image: &str, p: Priority) -> Arc<JobRecord> {
        board.create(id, image, Origin::Cri, p, crate::vocab::JobState::Fetching)
    }

    #[test]
    fn a_shared_blob_takes_the_highest_class_and_leaves_with_its_last_job() {
        let board = JobBoard::new();
        let demand = Demand::new();
        let a = ImageRef::parse("reg.test/app:1").unwrap();
        let b = ImageRef::parse("reg.test/app:2").unwrap();
        let pre = record(&board, 1, &a.whole(), Priority::prewarm(0));
        let pod = record(&board, 2, &b.whole(), Priority::urgent(0));
        let shared = Key::of(&a, desc('1', 1).digest().as_ref());
        let only_a = Key::of(&a, desc('2', 1).digest().as_ref());

        let ra = demand.register(&pre, &a, &Credentials::Anonymous, &resolved(&['1', '2']));
        assert_eq!(demand.class(&shared, Class::Urgent), Class::Prewarm);
        let rb = demand.register(&pod, &b, &Credentials::Anonymous, &resolved(&['1']));
        assert_eq!(demand.class(&shared, Class::Prewarm), Class::Urgent);
        assert_eq!(demand.class(&only_a, Class::Urgent), Class::Prewarm);
        // The same digest in another repository is the same download in containerd.
        let c = ImageRef::parse("reg.test/other:1").unwrap();
        let other = record(&board, 3, &c.whole(), Priority::prewarm(0));
        let rc = demand.register(&other, &c, &Credentials::Anonymous, &resolved(&['1']));
        let elsewhere = Key::of(&c, desc('1', 1).digest().as_ref());
        assert_eq!(demand.class(&elsewhere, Class::Prewarm), Class::Urgent);
        drop(rc);
        let Access::Granted(src) = demand.blob(&shared, None) else {
            panic!("public blob")
        };
        assert_eq!(src.job, pod.id);

        demand.progress(&shared, 60);
        assert_eq!(pre.progress.totals().0, 60);
        assert_eq!(pod.progress.totals().0, 60);

        drop(rb);
        assert_eq!(demand.class(&shared, Class::Urgent), Class::Prewarm);
        assert!(matches!(
            demand.manifest(&Key::of(&b, "2"), None),
            Access::Unknown
        ));
        assert!(matches!(
            demand.manifest(&Key::of(&a, "1"), None),
            Access::Granted(_)
        ));
        drop(ra);
        assert_eq!(demand.len(), (0, 0));
        assert!(demand.state.lock().by_digest.is_empty());
        assert!(matches!(demand.blob(&shared, None), Access::Unknown));
    }

    #[test]
    fn credentials_stay_with_their_repository() {
        let board = JobBoard::new();
        let demand = Demand::new();
        let a = ImageRef::parse("reg.test/team-a/app:1").unwrap();
        let job = record(&board, 1, &a.whole(), Priority::urgent(0));
        let creds = Credentials::Basic {
            username: "u".into(),
            password: "p".into(),
        };
        let _r = demand.register(&job, &a, &creds, &resolved(&['1']));
        let digest = desc('1', 1).digest().to_string();
        let other_repo = Key {
            registry: a.registry.clone(),
            repository: "team-b/app".into(),
            name: digest.clone(),
        };
        let other_registry = Key {
            registry: "elsewhere.test".into(),
            repository: a.repository.clone(),
            name: digest.clone(),
        };
        let right = Presented {
            username: "u".into(),
            password: "p".into(),
        };
        let wrong = Presented {
            password: "x".into(),
            ..right.clone()
        };
        let own = Key::of(&a, &digest);
        assert!(matches!(
            demand.blob(&own, Some(&right)),
            Access::Granted(_)
        ));
        assert!(matches!(demand.blob(&own, None), Access::Challenge));
        assert!(matches!(demand.blob(&own, Some(&wrong)), Access::Unknown));
        assert!(matches!(
            demand.manifest(&Key::of(&a, "1"), None),
            Access::Challenge
        ));
        assert!(matches!(
            demand.manifest(&Key::of(&a, "1"), Some(&wrong)),
            Access::Unknown
        ));
        for key in [&other_repo, &other_registry] {
            assert!(matches!(demand.blob(key, Some(&right)), Access::Unknown));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_early_request_waits_for_the_resolution_of_its_repository() {
        let board = JobBoard::new();
        let demand = Demand::new();
        let a = ImageRef::parse("reg.test/app:1").unwrap();
        let key = Key::of(&a, desc('1', 1).digest().as_ref());
        let elsewhere = Key {
            repository: "other".into(),
            ..key.clone()
        };
        let max = std::time::Duration::from_secs(10);
        assert!(!demand.settle(&key, max).await, "nothing in flight");

        let resolving = demand.resolving(&a);
        assert!(!demand.settle(&elsewhere, max).await, "another repository");
        let job = record(&board, 1, &a.whole(), Priority::urgent(0));
        let waiter = {
            let (demand, key) = (demand.clone(), key.clone());
            tokio::spawn(async move {
                let waited = demand.settle(&key, max).await;
                (
                    waited,
                    matches!(demand.blob(&key, None), Access::Granted(_)),
                )
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "held while the resolution runs");
        let _reg = demand.register(&job, &a, &Credentials::Anonymous, &resolved(&['1']));
        drop(resolving);
        assert_eq!(waiter.await.unwrap(), (true, true));

        // A resolution that never ends holds a request for `max` only.
        let _stuck = demand.resolving(&a);
        let t0 = tokio::time::Instant::now();
        assert!(!demand.settle(&elsewhere, max).await);
        assert!(demand.settle(&key, max).await);
        assert_eq!(t0.elapsed(), max);
    }

    #[test]
    fn basic_headers_parse() {
        let p = Presented::from_header("Basic dTpwOnE=").unwrap();
        assert_eq!((p.username.as_str(), p.password.as_str()), ("u", "p:q"));
        assert!(Presented::from_header("Bearer abc").is_none());
        assert!(Presented::from_header("Basic !!!").is_none());
        assert!(
            Presented::from_header("Basic dXNlcg==").is_none(),
            "no colon"
        );
    }
}
