//! Bytes over time, by class, measured the same way for both arms: containerd's own view of its
//! content store (unfinished ingests' offsets, committed blobs' sizes), sampled every 100 ms.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::store::Store;
use plotters::prelude::*;
use tokio::sync::Notify;

/// (seconds since start, cumulative bytes per class: [urgent, prewarm]).
pub type Series = Vec<(f64, [u64; 2])>;

pub struct Sampler {
    stop: Arc<Notify>,
    task: tokio::task::JoinHandle<Series>,
}

impl Sampler {
    /// `blobs`: digest → (class index, size).
    pub fn start(store: Store, blobs: HashMap<String, (usize, u64)>, t0: Instant) -> Self {
        let stop = Arc::new(Notify::new());
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let mut series = Vec::new();
            let mut committed: HashMap<String, bool> = HashMap::new();
            loop {
                let mut sum = [0u64; 2];
                let ingests = store.ingests().await;
                let offsets: HashMap<String, u64> = ingests
                    .into_iter()
                    .filter_map(|(reference, offset, _)| {
                        let digest = reference.split_once('-').map(|(_, d)| d.to_string())?;
                        Some((digest, offset.max(0) as u64))
                    })
                    .collect();
                for (digest, (class, size)) in &blobs {
                    let done = match committed.get(digest) {
                        Some(true) => true,
                        _ if offsets.contains_key(digest) => false,
                        _ => {
                            let present = store.has(digest).await;
                            if present {
                                committed.insert(digest.clone(), true);
                            }
                            present
                        }
                    };
                    sum[*class] += if done {
                        *size
                    } else {
                        offsets.get(digest).copied().unwrap_or(0)
                    };
                }
                series.push((t0.elapsed().as_secs_f64(), sum));
                tokio::select! {
                    _ = s.notified() => return series,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        });
        Sampler { stop, task }
    }

    pub async fn finish(self) -> Series {
        self.stop.notify_one();
        self.task.await.unwrap()
    }
}

/// Rates (bytes/s) per class in `bin`-second bins.
pub fn rates(series: &Series, bin: f64) -> Vec<(f64, [f64; 2])> {
    let mut out = Vec::new();
    let Some(end) = series.last().map(|s| s.0) else {
        return out;
    };
    let at = |t: f64| -> [u64; 2] {
        series
            .iter()
            .take_while(|(st, _)| *st <= t)
            .last()
            .map(|(_, b)| *b)
            .unwrap_or([0, 0])
    };
    let mut t = 0.0;
    while t < end {
        let (a, b) = (at(t), at(t + bin));
        out.push((
            t + bin / 2.0,
            // An ingest that goes away (a failed attempt pulled again) lowers the sum: no negative
            // rate for it.
            [
                b[0].saturating_sub(a[0]) as f64 / bin,
                b[1].saturating_sub(a[1]) as f64 / bin,
            ],
        ));
        t += bin;
    }
    out
}

/// Two panels side by side: bytes/s by class over time, containerd direct and through pullgate.
pub fn plot(path: &Path, title: &str, arms: &[(&str, &Series, Option<f64>)]) {
    register_font();
    let root = BitMapBackend::new(path, (1400, 520)).into_drawing_area();
    root.fill(&WHITE).unwrap();
    let root = root.titled(title, ("sans-serif", 22)).unwrap();
    let panels = root.split_evenly((1, arms.len()));
    let binned: Vec<_> = arms.iter().map(|(_, s, _)| rates(s, 0.5)).collect();
    let t_max = arms
        .iter()
        .filter_map(|(_, s, _)| s.last().map(|x| x.0))
        .fold(1.0, f64::max);
    let y_max = binned
        .iter()
        .flatten()
        .map(|(_, r)| r[0].max(r[1]) / 1e6)
        .fold(1.0, f64::max)
        * 1.15;
    for ((panel, (name, _, urgent_done)), bins) in panels.iter().zip(arms).zip(&binned) {
        let mut chart = ChartBuilder::on(panel)
            .caption(*name, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..t_max, 0.0..y_max)
            .unwrap();
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc("MB/s received")
            .draw()
            .unwrap();
        for (class, color, label) in [(0, RED, "urgent (pod waits)"), (1, BLUE, "prewarm")] {
            chart
                .draw_series(LineSeries::new(
                    bins.iter().map(|(t, r)| (*t, r[class] / 1e6)),
                    color.stroke_width(2),
                ))
                .unwrap()
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        }
        if let Some(t) = urgent_done {
            chart
                .draw_series(LineSeries::new(
                    vec![(*t, 0.0), (*t, y_max)],
                    RED.mix(0.4).stroke_width(1),
                ))
                .unwrap()
                .label("urgent pull answered")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], RED.mix(0.4)));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .unwrap();
    }
    root.present().unwrap();
}

/// One panel: a cumulative figure over time per arm (e.g. upstream MB), with a dashed line at
/// `reference` (e.g. the unique bytes every node needs).
pub fn plot_cumulative(
    path: &Path,
    title: &str,
    y_desc: &str,
    arms: &[(&str, Vec<(f64, f64)>)],
    reference: (&str, f64),
) {
    register_font();
    let root = BitMapBackend::new(path, (1000, 560)).into_drawing_area();
    root.fill(&WHITE).unwrap();
    let t_max = arms
        .iter()
        .filter_map(|(_, s)| s.last().map(|x| x.0))
        .fold(1.0, f64::max);
    let y_max = arms
        .iter()
        .flat_map(|(_, s)| s.iter().map(|x| x.1))
        .fold(reference.1, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..t_max, 0.0..y_max)
        .unwrap();
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc(y_desc)
        .draw()
        .unwrap();
    let colors = [RED, BLUE, GREEN, MAGENTA];
    for ((name, series), color) in arms.iter().zip(colors) {
        chart
            .draw_series(LineSeries::new(
                series.iter().copied(),
                color.stroke_width(2),
            ))
            .unwrap()
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
    }
    let (label, y) = reference;
    chart
        .draw_series(DashedLineSeries::new(
            vec![(0.0, y), (t_max, y)],
            6,
            4,
            BLACK.mix(0.6).stroke_width(1),
        ))
        .unwrap()
        .label(label)
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.mix(0.6)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .unwrap();
    root.present().unwrap();
}

/// The font every plot's text uses (Debian's DejaVu Sans).
fn register_font() {
    let font = std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
        .expect("font (apt-get install fonts-dejavu-core)");
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, font);
}
