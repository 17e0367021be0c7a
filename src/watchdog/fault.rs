//! TEST-ONLY fault: a wedged main runtime, as a deadlock or a blocking call on every worker
//! would leave it, without stopping the process (SIGSTOP would stop the front door's thread
//! too). Armed only when `PULLGATE_FAULT_INJECTION=1` is in the environment; never set it on a
//! node. Then SIGUSR2 puts a task that sleeps in a blocking call on every worker of the main
//! runtime, for good: the process stays up, its sockets keep accepting in the kernel, and
//! nothing on the main runtime runs again.

use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, warn};

/// The variable that arms it.
pub const ENV: &str = "PULLGATE_FAULT_INJECTION";

/// Arms the fault if the environment asks for it; call on the main runtime.
pub fn arm_if_asked() {
    if std::env::var_os(ENV).is_none_or(|v| v != "1") {
        return;
    }
    let mut usr2 = match signal(SignalKind::user_defined2()) {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "{ENV}=1 but SIGUSR2 cannot be handled: fault not armed");
            return;
        }
    };
    warn!("{ENV}=1: fault injection armed (test only): SIGUSR2 wedges the main runtime for good");
    tokio::spawn(async move {
        if usr2.recv().await.is_none() {
            return;
        }
        let workers = tokio::runtime::Handle::current().metrics().num_workers();
        error!(
            workers,
            "SIGUSR2 with {ENV}=1: wedging every worker of the main runtime (test fault)"
        );
        // One more than there are workers: whichever worker is free takes the next one, and
        // the handler's own worker takes one when this task returns.
        for _ in 0..=workers {
            tokio::spawn(async {
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(3600));
                }
            });
        }
    });
}
