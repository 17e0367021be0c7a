//! The front door's own thread.
//!
//! Passthrough calls (ImageStatus, ListImages, ...) sit on kubelet's pod start-up path. On the
//! shared runtime they queued behind the mirror's blob streams, and on a node whose cores are busy
//! with a big pull (containerd hashing and unpacking) every hop through pullgate waited for a CPU
//! behind containerd: +5 ms at p99. Here one current-thread runtime serves the CRI socket and
//! keeps its own connection to containerd, so a call is relayed by one thread without waking
//! others, and that thread runs at a raised CPU priority (`server.nice`). Pulls are handed to the
//! main runtime: the thread only reads and relays.

use std::future::Future;
use std::io;
use std::sync::mpsc;

use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;
use tokio_util::task::AbortOnDropHandle;

/// The thread and its runtime; dropping it stops both (tasks still running are cancelled).
pub struct FrontDoorThread {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What became of the requested CPU priority.
#[derive(Debug, PartialEq, Eq)]
pub enum Priority {
    /// Left as the process has it (`server.nice = 0`).
    Unchanged,
    Set(i32),
    /// The kernel refused (negative nice values need CAP_SYS_NICE or RLIMIT_NICE).
    Refused(i32, String),
}

impl FrontDoorThread {
    /// Starts the thread; `nice` is its nice value, 0 to leave it.
    pub fn start(nice: i32) -> io::Result<(FrontDoorThread, Priority)> {
        let rt = Builder::new_current_thread()
            .enable_all()
            .thread_name("pullgate-cri")
            .build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let (told, priority) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("pullgate-cri".into())
            .spawn(move || {
                let _ = told.send(set_nice(nice));
                rt.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        let priority = priority
            .recv()
            .map_err(|_| io::Error::other("the front door's thread ended at start"))?;
        Ok((
            FrontDoorThread {
                handle,
                stop: Some(stop),
                thread: Some(thread),
            },
            priority,
        ))
    }

    /// The runtime, for things that must be created on it (the containerd channel spawns its
    /// connection task where it is built).
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Runs `f` on the thread; the task is cancelled when the handle is dropped.
    pub fn spawn<F>(&self, f: F) -> AbortOnDropHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        AbortOnDropHandle::new(self.handle.spawn(f))
    }
}

impl Drop for FrontDoorThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sets the calling thread's nice value. Linux keeps nice per thread, so this leaves the rest
/// of the process (the byte path) as it is.
fn set_nice(nice: i32) -> Priority {
    if nice == 0 {
        return Priority::Unchanged;
    }
    // SAFETY: plain system calls on the calling thread's own id.
    let rc = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice)
    };
    if rc == 0 {
        Priority::Set(nice)
    } else {
        Priority::Refused(nice, io::Error::last_os_error().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nice_of_thread_named(name: &str) -> Option<i32> {
        for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.trim() == name {
                let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
                // Field 19 is the nice value; the command name before it is parenthesized.
                let after = &stat[stat.rfind(')')? + 2..];
                return after.split(' ').nth(16)?.parse().ok();
            }
        }
        None
    }

    // One test: the thread is found by name, and a second one running beside it would be found too.
    #[test]
    fn runs_tasks_on_its_own_thread_at_its_own_priority() {
        // Raising the nice value needs no privilege, so this holds for every user.
        let own = || unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) };
        let before = own();
        let nice = (before + 3).min(19);
        let (t, priority) = FrontDoorThread::start(nice).unwrap();
        assert_eq!(priority, Priority::Set(nice));
        let (tx, rx) = mpsc::channel();
        let task = t.spawn(async move {
            tx.send(std::thread::current().name().map(str::to_owned))
                .unwrap();
        });
        assert_eq!(rx.recv().unwrap().as_deref(), Some("pullgate-cri"));
        drop(task);
        assert_eq!(nice_of_thread_named("pullgate-cri"), Some(nice));
        // The caller's own thread is untouched.
        assert_eq!(own(), before);
        // Dropping a task's handle cancels the task (its sender goes with it).
        let (tx, rx) = oneshot::channel::<()>();
        let task = t.spawn(async move {
            let _keep = tx;
            std::future::pending::<()>().await
        });
        drop(task);
        assert!(t.handle().block_on(rx).is_err());
        drop(t);
        assert_eq!(
            nice_of_thread_named("pullgate-cri"),
            None,
            "the thread ends with it"
        );
    }
}
