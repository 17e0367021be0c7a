//! The CLI's side of the API: `pullgate prewarm`, `jobs`, `cancel` and `wait --prewarmed`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

use crate::proto::pullgate::v1 as pb;
use crate::proto::pullgate::v1::pullgate_client::PullgateClient;

type Client = PullgateClient<Channel>;

/// Connects to the API socket; the error says what to check.
pub async fn connect(socket: &Path) -> Result<Client, String> {
    let path = socket.to_path_buf();
    let channel = Endpoint::from_static("http://pullgate.sock")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .map_err(|e| {
            format!(
                "cannot reach pullgate's API at {}: {} (is pullgate running with [api] enabled?)",
                socket.display(),
                crate::errors::chain(&e)
            )
        })?;
    Ok(PullgateClient::new(channel))
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("pullgate: {msg}");
    ExitCode::FAILURE
}

pub async fn prewarm(socket: PathBuf, image: String, priority: i32, wait: bool) -> ExitCode {
    let mut client = match connect(&socket).await {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let resp = match client
        .submit(pb::SubmitRequest {
            image: image.clone(),
            priority,
        })
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) => return fail(s.message()),
    };
    println!(
        "job {}: {}{}",
        resp.job_id,
        resp.image,
        if resp.joined {
            " (joined a pull in flight)"
        } else {
            ""
        }
    );
    if !wait {
        return ExitCode::SUCCESS;
    }
    follow(&mut client, resp.job_id).await
}

/// Shows a job's progress (a bar for the image, one per layer) until it ends.
async fn follow(client: &mut Client, id: u64) -> ExitCode {
    let mut stream = match client
        .watch(pb::WatchRequest {
            job_id: id,
            interval_ms: 250,
        })
        .await
    {
        Ok(s) => s.into_inner(),
        Err(s) => return fail(s.message()),
    };
    // Bars on a terminal; plain lines (state changes, then every few seconds) in logs and CI.
    let tty = std::io::stderr().is_terminal();
    let mut printed: Option<(String, std::time::Instant)> = None;
    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template(
        "{prefix:>14} [{bar:30}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} {msg}",
    )
    .expect("valid template")
    .progress_chars("=> ");
    let total = bars.add(ProgressBar::new(0).with_style(style.clone()));
    total.set_prefix("image");
    let mut layers: Vec<ProgressBar> = Vec::new();
    let mut last: Option<pb::Job> = None;
    loop {
        let msg = match stream.message().await {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(s) => return fail(format!("watching job {id}: {}", s.message())),
        };
        let Some(job) = msg.jobs.into_iter().next() else {
            continue;
        };
        if !tty {
            let due = printed.as_ref().is_none_or(|(state, at)| {
                *state != job.state || at.elapsed() >= Duration::from_secs(2)
            });
            if due {
                let pct = (job.bytes_done * 100)
                    .checked_div(job.bytes_total)
                    .unwrap_or(0);
                eprintln!(
                    "job {}: {} {}/{} bytes ({pct}%)",
                    job.id, job.state, job.bytes_done, job.bytes_total
                );
                printed = Some((job.state.clone(), std::time::Instant::now()));
            }
        }
        total.set_length(job.bytes_total);
        total.set_position(job.bytes_done);
        total.set_message(format!("{} ({} {})", job.state, job.class, job.priority));
        for (i, l) in job.layers.iter().enumerate() {
            if layers.len() <= i {
                let b = bars.add(ProgressBar::new(l.size).with_style(style.clone()));
                b.set_prefix(short_digest(&l.digest));
                layers.push(b);
            }
            layers[i].set_position(l.done);
        }
        last = Some(job);
    }
    total.finish();
    layers.iter().for_each(|b| b.finish());
    match last {
        Some(j) if j.state == "done" => {
            println!(
                "job {}: {} done in {:.1}s ({} bytes)",
                j.id,
                j.image,
                j.elapsed_ms as f64 / 1000.0,
                j.bytes_total
            );
            ExitCode::SUCCESS
        }
        Some(j) => fail(format!("job {} {}: {}", j.id, j.state, j.message)),
        None => fail(format!("job {id} vanished")),
    }
}

fn short_digest(d: &str) -> String {
    let hex = d.strip_prefix("sha256:").unwrap_or(d);
    hex.chars().take(12).collect()
}

pub async fn jobs(socket: PathBuf, all: bool) -> ExitCode {
    let mut client = match connect(&socket).await {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let jobs = match client.list(pb::ListRequest { all }).await {
        Ok(r) => r.into_inner().jobs,
        Err(s) => return fail(s.message()),
    };
    print!("{}", table(&jobs));
    ExitCode::SUCCESS
}

/// The `pullgate jobs` table.
pub fn table(jobs: &[pb::Job]) -> String {
    let mut rows = vec![[
        "ID".to_string(),
        "CLASS".into(),
        "PRIO".into(),
        "STATE".into(),
        "PROGRESS".into(),
        "QUEUED".into(),
        "AGE".into(),
        "ORIGIN".into(),
        "IMAGE".into(),
    ]];
    for j in jobs {
        let pct = match (j.bytes_done * 100).checked_div(j.bytes_total) {
            Some(p) => format!("{p:>3}% of {}", human(j.bytes_total)),
            None => "-".into(),
        };
        let image = if j.message.is_empty() {
            j.image.clone()
        } else {
            format!("{} ({})", j.image, j.message)
        };
        rows.push([
            j.id.to_string(),
            j.class.clone(),
            j.priority.to_string(),
            j.state.clone(),
            pct,
            format!("{:.1}s", j.queue_wait_ms as f64 / 1000.0),
            format!("{:.0}s", j.elapsed_ms as f64 / 1000.0),
            j.origin.clone(),
            image,
        ]);
    }
    let widths: Vec<usize> = (0..9)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn human(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1}{}", UNITS[u])
}

pub async fn cancel(socket: PathBuf, id: u64) -> ExitCode {
    let mut client = match connect(&socket).await {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    match client.cancel(pb::CancelRequest { job_id: id }).await {
        Ok(_) => {
            println!("job {id} cancelled");
            ExitCode::SUCCESS
        }
        Err(s) => fail(s.message()),
    }
}

/// `wait --prewarmed`: 0 once every configured prewarm image is present; 1 when one failed or
/// the timeout passed. An API that is not up yet (pullgate starting) is waited for.
pub async fn wait_prewarmed(socket: PathBuf, timeout: Option<Duration>) -> ExitCode {
    // A timeout too long to add to the clock is no deadline at all.
    let deadline = timeout.and_then(|t| tokio::time::Instant::now().checked_add(t));
    let mut last_report = String::new();
    loop {
        let report = match connect(&socket).await {
            Ok(mut c) => match c.prewarm_status(pb::PrewarmStatusRequest {}).await {
                Ok(r) => {
                    let entries = r.into_inner().entries;
                    if let Some(f) = entries.iter().find(|e| e.state == "failed") {
                        return fail(format!("prewarm of {} failed: {}", f.image, f.message));
                    }
                    let pending: Vec<_> = entries
                        .iter()
                        .filter(|e| e.state != "present")
                        .map(|e| e.image.as_str())
                        .collect();
                    if pending.is_empty() {
                        println!("all {} prewarm images present", entries.len());
                        return ExitCode::SUCCESS;
                    }
                    format!("waiting for {}", pending.join(", "))
                }
                Err(s) => format!("API error: {}", s.message()),
            },
            Err(e) => e,
        };
        if report != last_report {
            eprintln!("pullgate: {report}");
            last_report = report;
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            return fail(format!("timed out: {last_report}"));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let jobs = vec![
            pb::Job {
                id: 7,
                image: "docker.io/library/busybox:latest".into(),
                class: "prewarm".into(),
                priority: 3,
                state: "fetching".into(),
                origin: "api".into(),
                bytes_total: 2 << 20,
                bytes_done: 1 << 20,
                ..Default::default()
            },
            pb::Job {
                id: 12,
                image: "x".into(),
                class: "urgent".into(),
                state: "failed".into(),
                message: "boom".into(),
                ..Default::default()
            },
        ];
        let t = table(&jobs);
        let lines: Vec<_> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[1].contains(" 50% of 2.0MiB"), "{t}");
        assert!(lines[2].contains("x (boom)"), "{t}");
        let col = lines[0].find("STATE").unwrap();
        assert_eq!(&lines[1][col..col + 8], "fetching");
    }
}
